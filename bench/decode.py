#!/usr/bin/env python3
"""Decode benchmark: ollm-jax `generation.decode` against the memory roofline and against
Hugging Face transformers (static cache, auto torch.compile), in the same run on the
same card.

Random bf16 weights of real model shapes (decode speed does not depend on the values).
For each (model, batch):

- ours: prefill (timed, reported once as the median), then `decode` from step 1 to
  `new_tokens` with `eos_ids=()` so every row produces every token. One untimed run
  compiles; the median of `--reps` timed runs is reported.
  ms/step = decode time / (new_tokens - 1).
- HF: `LlamaForCausalLM.generate(..., cache_implementation="static")`, warmed up twice,
  then ms/step = (time of N new tokens - time of 2 new tokens) / (N - 2), which cancels
  prefill and call overhead.
- roofline: (weight bytes + KV bytes read per step) / copy bandwidth, where weight
  bytes = all parameters (a tied embedding counted once: the LM head reads all of it;
  the lookup reads only B rows) and KV bytes = bytes_per_token * B * (prompt +
  new_tokens / 2), the mean context over the decode.

Usage (from the repo root; the package need not be installed):
  python3 bench/decode.py --models 1b 8b --batch 1 8 32 --out bench/results/
  python3 bench/decode.py --tiny --no-hf        # CPU smoke test, seconds
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: do not grab 75% of the GPU up front, so torch (HF, copy_)
# can allocate in the same process; cap jax's pool at half the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
# Reruns on a warm machine skip XLA compilation (compile times are informational only).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ollm_jax_bench_jit_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from ollm_jax import kv_cache, model  # noqa: E402
from ollm_jax.config import ModelConfig  # noqa: E402
from ollm_jax.generation import check_prompt, decode, prefill  # noqa: E402
from ollm_jax.sampling import SamplingParams  # noqa: E402

# Hugging Face config dicts (transformers 5 layout: `rope_parameters`).
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "1b": {  # Llama-3.2-1B
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "8b": {  # Llama-3.1-8B
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "tiny": {  # CPU smoke test
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}

CONVENTION = (
    "roofline ms/step = (weight bytes + KV bytes) / copy bandwidth; weight bytes = all parameters "
    "(tied embedding once: the LM head reads it whole, the lookup only B rows); KV bytes = "
    "bytes_per_token * B * (prompt + new_tokens/2), the mean context over the decode; "
    "copy bandwidth = max(jax x+1, torch copy_) counting read + write; ms/step = decode time / "
    "(new_tokens - 1) for ours, (t(N) - t(2)) / (N - 2) for HF; tok/s = B / step time; "
    "GB/s = (weight + KV bytes) / step time; % roofline = roofline time / measured time."
)

HF_SHORT_TOKENS = 2  # the short HF run whose time is subtracted to cancel prefill


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["1b", "8b"], choices=["1b", "8b"])
    p.add_argument("--batch", nargs="+", type=int, default=None, help="default 1 8 32 (tiny: 1 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (tiny: 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (tiny: 16)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    p.add_argument("--hf-batch", nargs="+", type=int, default=[1, 8],
                   help="batches HF runs (each compiles anew; default 1 8)")
    p.add_argument("--kv-format", default=None, help="our KV cache format (default: the model dtype)")
    p.add_argument("--attention-impl", default="auto", help="passed to ollm_jax.attention.attend")
    p.add_argument("--copy-gib", type=float, default=None, help="copy-bandwidth buffer (default 2; tiny 0.0625)")
    p.add_argument("--out", default=None,
                   help="JSON file for the results (rewritten after every row); a directory (e.g. "
                        "bench/results/) names the file <date>-<card>-decode.json inside it")
    p.add_argument("--tiny", action="store_true", help="tiny config on any device (smoke test)")
    p.add_argument("--hf-only", metavar="JSON", default=None,
                   help="internal: run only torch copy_ and HF, write them to JSON (the parent run starts "
                        "this in a child process so torch never shares a process with our timed decode)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.models = ["tiny"]
    tiny = args.tiny
    args.batch = args.batch or ([1, 4] if tiny else [1, 8, 32])
    args.prompt_len = args.prompt_len or (32 if tiny else 512)
    args.new_tokens = args.new_tokens or (16 if tiny else 256)
    args.copy_gib = args.copy_gib or (1 / 16 if tiny else 2.0)
    if args.new_tokens <= HF_SHORT_TOKENS:
        p.error(f"--new-tokens={args.new_tokens} must exceed {HF_SHORT_TOKENS}")
    return args


def output_path(out: str | None, env: dict[str, Any], models: list[str]) -> str | None:
    """`out` itself, or for a directory <date>-<card>-decode[-<models>].json inside it
    (the suffix only when not both 1b and 8b ran)."""
    if out is None:
        return None
    if out.endswith(os.sep) or os.path.isdir(out):
        date = env["date_utc"][:10]
        models = "" if sorted(models) == ["1b", "8b"] else "-" + "-".join(models)
        return os.path.join(out, f"{date}-{common.card_slug(env)}-decode{models}.json")
    return out


# ----------------------------------------------------------------------------- ours


def bench_ours(params, cfg: ModelConfig, args, batch: int) -> dict[str, Any]:
    """Times prefill and decode of `generate` for one batch size; returns seconds."""
    key = jax.random.key(args.seed)
    prompt = jax.random.randint(key, (batch, args.prompt_len), 0, cfg.vocab_size, jnp.int32)  # [B, T]
    lengths = jnp.full((batch,), args.prompt_len, jnp.int32)  # [B]
    n = args.new_tokens
    check_prompt(cfg, prompt, lengths, n)
    common_kw = dict(sampling=SamplingParams(), eos_ids=(), attention_impl=args.attention_impl)

    def run_once():
        seconds_p, state = common.timed(lambda: jax.block_until_ready(prefill(
            params, cfg, prompt, lengths, key, max_new_tokens=n, kv_format=args.kv_format, **common_kw)))
        # `decode` donates the state: every run needs a fresh prefill.
        seconds_d, state = common.timed(lambda: jax.block_until_ready(
            decode(params, cfg, state, n, **common_kw)))
        return seconds_p, seconds_d, state

    first_prefill_s, first_decode_s, state = run_once()  # compiles both
    step, num_tokens = jax.device_get((state.step, state.num_tokens))
    if int(step) != n or (num_tokens != n).any():
        raise RuntimeError(f"decode stopped early: step={int(step)}, num_tokens={num_tokens.tolist()}, {n=}")
    del state
    prefill_s, decode_s = [], []
    for _ in range(args.reps):
        p_s, d_s, state = run_once()
        del state
        prefill_s.append(p_s)
        decode_s.append(d_s)
    return {
        "first_call_s": {"prefill": first_prefill_s, "decode": first_decode_s},  # includes compilation
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_ms": common.median(prefill_s) * 1e3,
        "decode_ms": common.median(decode_s) * 1e3,
        "ms_per_step": common.median(decode_s) * 1e3 / (n - 1),
    }


# ----------------------------------------------------------------------------- Hugging Face


def hf_model(torch, hf_config: dict[str, Any]):
    """A random-weight bf16 `LlamaForCausalLM` built directly on the GPU."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    config = LlamaConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
    with torch.device("cuda"):
        hf = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return hf.eval()


def bench_hf(torch, hf, cfg: ModelConfig, args, batch: int) -> dict[str, Any]:
    """Times HF generate with a static cache at N and at 2 new tokens; returns seconds."""
    import time

    torch._dynamo.reset()  # compile this batch's shapes fresh (no automatic-dynamic batch dim)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, cache_implementation="static", max_cache_len=args.prompt_len + n,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if tuple(out.shape) != (batch, args.prompt_len + new_tokens):
            raise RuntimeError(f"HF generate returned shape {tuple(out.shape)}, wanted "
                               f"{(batch, args.prompt_len + new_tokens)}")
        return seconds

    # Long first so the static cache is sized for N and the short run reuses its graphs.
    warmup = [run(n), run(n), run(HF_SHORT_TOKENS), run(HF_SHORT_TOKENS)]
    long_s, short_s = [], []
    for _ in range(args.reps):
        long_s.append(run(n))
        short_s.append(run(HF_SHORT_TOKENS))
    step_s = (common.median(long_s) - common.median(short_s)) / (n - HF_SHORT_TOKENS)
    return {
        "compiled": hasattr(hf, "_compiled_call"),  # generate's auto torch.compile kicked in
        "warmup_s": warmup,
        "generate_s": long_s,
        "generate_short_s": short_s,
        "short_tokens": HF_SHORT_TOKENS,
        "ms_per_step": step_s * 1e3,
    }


def free_torch(torch) -> None:
    gc.collect()
    if torch is not None:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report


def derived(row: dict[str, Any], side: str, bandwidth: float) -> None:
    """Adds tok/s, GB/s and % of roofline to row[side] from its ms_per_step."""
    r = row[side]
    step_s = r["ms_per_step"] / 1e3
    if step_s <= 0:  # HF's difference can go non-positive only if timing is broken
        r.update(tok_per_s=None, GBps=None, pct_roofline=None)
        return
    r["tok_per_s"] = row["batch"] / step_s
    r["GBps"] = (row["weight_bytes"] + row["kv_bytes_per_step"]) / step_s / 1e9
    r["pct_roofline"] = 100 * row["roofline_ms"] / r["ms_per_step"]


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "B", "roofline ms", "ours ms/step", "ours tok/s", "ours GB/s", "ours %roof",
               "prefill ms", "HF ms/step", "HF tok/s", "HF %roof", "ours/HF"]
    out = []
    for r in rows:
        ours, hf = r.get("ours") or {}, r.get("hf") or {}
        if "error" in ours:
            ours = {}
        hf_note = "error" if "error" in hf else ("skipped" if r.get("hf") is None else None)
        out.append([
            r["model"], r["batch"], fmt(r["roofline_ms"], ".3f"),
            fmt(ours.get("ms_per_step"), ".3f"), fmt(ours.get("tok_per_s"), ",.0f"),
            fmt(ours.get("GBps"), ",.0f"), fmt(ours.get("pct_roofline"), ".1f"),
            fmt(ours.get("prefill_ms"), ".1f"),
            hf_note or fmt(hf.get("ms_per_step"), ".3f"), fmt(hf.get("tok_per_s"), ",.0f"),
            fmt(hf.get("pct_roofline"), ".1f"), fmt(r.get("speedup_vs_hf"), ".2f"),
        ])
    return common.format_table(headers, out)


def hf_only(args) -> int:
    """Child-process mode: torch copy_ bandwidth and HF static-cache decode, written to JSON."""
    torch = common.torch_cuda()
    out: dict[str, Any] = {"torch_Bps": None, "hf": {}, "skipped": None}
    if torch is None:
        out["skipped"] = "torch with CUDA is not available"
    else:
        try:
            import transformers  # noqa: F401
        except Exception as e:
            out["skipped"] = f"transformers import failed: {e!r}"
    if out["skipped"] is None:
        out["torch_Bps"] = common.torch_copy_bandwidth(int(args.copy_gib * 2**30))
        for name in args.models:
            cfg = ModelConfig.from_hf(HF_CONFIGS[name], dtype="bfloat16")
            hf = None
            try:
                t_build, hf = common.timed(lambda: hf_model(torch, HF_CONFIGS[name]))
                print(f"  HF {name} model built on the GPU in {t_build:.1f} s")
                for batch in [b for b in args.batch if b in args.hf_batch]:
                    try:
                        out["hf"][f"{name}/{batch}"] = bench_hf(torch, hf, cfg, args, batch)
                    except Exception as e:
                        traceback.print_exc()
                        out["hf"][f"{name}/{batch}"] = {"error": repr(e)}
            except Exception as e:
                traceback.print_exc()
                for batch in args.hf_batch:
                    out["hf"][f"{name}/{batch}"] = {"error": f"building the HF model failed: {e!r}"}
            finally:
                del hf
                free_torch(torch)
    common.save_json(args.hf_only, out)
    return 0


def hf_in_child(args) -> tuple[dict[str, Any], float | None, str | None]:
    """Runs `--hf-only` in a child process (same arguments) and reads its results."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf.json")
        argv = [a for a in sys.argv[1:]]
        if "--out" in argv:  # the child writes only its own JSON
            i = argv.index("--out")
            del argv[i : i + 2]
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--hf-only", path])
        if proc.returncode != 0 or not os.path.exists(path):
            return {}, None, f"the HF child process failed (exit {proc.returncode})"
        with open(path) as f:
            child = json.load(f)
    return child["hf"], child["torch_Bps"], child["skipped"]


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # a run killed by a time limit keeps its printed rows
    args = parse_args(argv)
    env = common.environment()
    common.print_environment(env)
    if env["jax_backend"] == "cpu" and not args.tiny:
        print("WARNING     jax runs on the CPU: real model shapes will take very long (use --tiny)")
    out_path = output_path(args.out, env, args.models)

    if args.hf_only:
        return hf_only(args)
    hf_done, torch_bw, hf_reason = ({}, None, "--no-hf") if args.no_hf else hf_in_child(args)
    if hf_reason:
        print(f"HF          skipped ({hf_reason})")

    if torch_bw is None:  # HF skipped or failed: torch copy_ still sets the ceiling where torch exists
        torch_bw = common.torch_copy_bandwidth_in_child(int(args.copy_gib * 2**30))
    copy = common.copy_bandwidth(int(args.copy_gib * 2**30), torch_bw)
    bandwidth = copy["used_Bps"]
    print(f"copy BW     jax x+1 {copy['jax_Bps'] / 1e9:,.0f} GB/s; torch copy_ "
          f"{fmt(copy['torch_Bps'] and copy['torch_Bps'] / 1e9, ',.0f')} GB/s; using {bandwidth / 1e9:,.0f} GB/s "
          f"({copy['source']}, {args.copy_gib:g} GiB buffer, read + write)")
    print(f"shapes      prompt {args.prompt_len}, new tokens {args.new_tokens}, reps {args.reps} (median), "
          f"kv_format {args.kv_format or 'model dtype'}, attention {args.attention_impl}")
    print(f"convention  {CONVENTION}")

    result = {"benchmark": "decode", "env": env, "args": vars(args), "copy_bandwidth": copy,
              "convention": CONVENTION, "hf_skipped": hf_reason, "rows": []}

    def save():
        if out_path:
            common.save_json(out_path, result)

    save()
    for name in args.models:
        hf_config = HF_CONFIGS[name]
        cfg = ModelConfig.from_hf(hf_config, dtype="bfloat16")
        t_init, params = common.timed(lambda: jax.block_until_ready(model.init_params(cfg, jax.random.key(args.seed))))
        weight_bytes = model.param_bytes(params)
        kv_per_token = kv_cache.bytes_per_token(cfg, args.kv_format)
        print(f"\n{name}: {model.num_params(params) / 1e9:.3f} B params, {weight_bytes / 1e9:.3f} GB weights, "
              f"{kv_per_token} KV bytes/token, init {t_init:.1f} s")

        rows = {}
        for batch in args.batch:
            kv_bytes = kv_per_token * batch * (args.prompt_len + args.new_tokens / 2)
            row = {"model": name, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "weight_bytes": weight_bytes, "kv_bytes_per_step": kv_bytes,
                   "roofline_ms": (weight_bytes + kv_bytes) / bandwidth * 1e3, "ours": None, "hf": None}
            try:
                row["ours"] = bench_ours(params, cfg, args, batch)
                derived(row, "ours", bandwidth)
                o = row["ours"]
                print(f"  ours B={batch:<3d} {o['ms_per_step']:.3f} ms/step  {o['tok_per_s']:,.0f} tok/s  "
                      f"{o['GBps']:,.0f} GB/s  {o['pct_roofline']:.1f}% of roofline ({row['roofline_ms']:.3f} ms)  "
                      f"prefill {o['prefill_ms']:.1f} ms  (first call {sum(o['first_call_s'].values()):.1f} s)")
            except Exception as e:
                traceback.print_exc()
                row["ours"] = {"error": repr(e)}
            rows[batch] = row
            result["rows"].append(row)
            save()

        del params
        gc.collect()
        for batch, row in rows.items():
            h = hf_done.get(f"{name}/{batch}")
            if h is None:
                continue
            row["hf"] = h
            if "error" in h:
                print(f"  HF   B={batch:<3d} failed: {h['error']}")
                continue
            derived(row, "hf", bandwidth)
            ours_ms = (row["ours"] or {}).get("ms_per_step")
            if ours_ms and h["ms_per_step"] > 0:
                row["speedup_vs_hf"] = h["ms_per_step"] / ours_ms
            print(f"  HF   B={batch:<3d} {h['ms_per_step']:.3f} ms/step  {fmt(h['tok_per_s'], ',.0f')} "
                  f"tok/s  {fmt(h['pct_roofline'], '.1f')}% of roofline  compiled={h['compiled']}  "
                  f"(warm-up {sum(h['warmup_s']):.1f} s, run in a child process)")
        save()

    print(f"\nDecode, prompt {args.prompt_len}, {args.new_tokens} new tokens, random bf16 weights, "
          f"card {env['jax_device_kind']}, copy bandwidth {bandwidth / 1e9:,.0f} GB/s ({copy['source']}), "
          f"{datetime.date.today().isoformat()}")
    print(table(result["rows"]))
    if out_path:
        print(f"\nsaved {out_path}")
    failed = any("error" in (r["ours"] or {}) for r in result["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
