"""The `ollm-jax` command: convert, chat, generate."""

from __future__ import annotations

import argparse
import os
import sys


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a converted checkpoint directory (see `ollm-jax convert`)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-format", default=None, help="KV cache format (default: the model's dtype)")
    p.add_argument("--dtype", default=None, help="load weights as this dtype (bfloat16, float32)")
    p.add_argument("--weights", default="bf16",
                   help="bf16 (as loaded) or int8 (weight-only int8 matrices, model.quantize_weights)")


def _load(args):
    from ollm_jax import checkpoint, model

    m = checkpoint.load(args.model, dtype=args.dtype)
    return m._replace(params=model.quantize_weights(m.params, args.weights))


def _sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, kv_format=args.kv_format,
    )


def _print_stats(c) -> None:
    print(
        f"\n[{c.prompt_tokens} prompt tokens, {len(c.tokens)} new tokens ({c.finish_reason}); "
        f"prefill {c.prefill_s:.2f} s incl. compilation; decode {c.tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _chat(args) -> int:
    from ollm_jax import engine

    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [args.prompt] if args.prompt is not None else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            user = prompts.pop(0)
            print(f">>> {user}")
        else:
            try:
                user = input(">>> ")
            except EOFError:
                return 0
            if user.strip() in ("", "/exit", "/quit"):
                return 0
        messages.append({"role": "user", "content": user})
        c = engine.chat(model, messages, on_text=_stream, **_sampling_kwargs(args))
        _print_stats(c)
        messages.append({"role": "assistant", "content": c.text})


def _generate(args) -> int:
    from ollm_jax import engine

    model = _load(args)
    sys.stdout.write(args.prompt)
    c = engine.complete(model, args.prompt, on_text=_stream, **_sampling_kwargs(args))
    _print_stats(c)
    return 0


def main(argv=None) -> int:
    # transformers is used for tokenizers and templates only; its "PyTorch was not found"
    # advice is noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="ollm-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from ollm_jax import convert

    p = sub.add_parser("convert", help="convert a Hugging Face directory or a .gguf file")
    convert.convert_cli_args(p)
    p.set_defaults(run=convert.convert_cli_main)

    p = sub.add_parser("chat", help="chat with a converted model (interactive without --prompt)")
    _add_sampling_args(p)
    p.add_argument("--prompt", default=None, help="one user message; omit for an interactive chat")
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(run=_chat)

    p = sub.add_parser("generate", help="continue a plain-text prompt (no chat template)")
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(run=_generate)

    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names the value
        print(f"ollm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
