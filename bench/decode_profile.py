#!/usr/bin/env python3
"""Where a decode step goes: its time, and every kernel it launches, per step.

For one model shape and batch (random bf16 weights): prefill a prompt, then time
`generation.decode` over `--new-tokens` tokens (median of `--reps` runs after a compiling
one; ms/step = time / (new_tokens - 1), CUDA graphs as XLA runs them by default), then
trace one more decode with `jax.profiler` and group its kernels by name: calls, µs per
step and µs per call, with the kernels per step and the GPU busy time per step beside
the weights' roofline. The speculative cost model (issue 5) needs the draft's step to
lose kernels, not bytes; this is the table that says which.

Usage (from the repo root):
  python3 bench/decode_profile.py --model 1b --out bench/results/
  python3 bench/decode_profile.py --model tiny --new-tokens 8     # CPU smoke test (no kernel table)
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from bench.decode import HF_CONFIGS  # noqa: E402
from ollm_jax import model  # noqa: E402
from ollm_jax.config import ModelConfig  # noqa: E402
from ollm_jax.generation import decode, prefill  # noqa: E402
from ollm_jax.sampling import SamplingParams  # noqa: E402


def kind(kernel: str) -> str:
    """A kernel's family: its name less XLA's numeric suffixes (`loop_add_fusion.12` ->
    `loop_add_fusion`)."""
    return re.sub(r"([._]\d+)+$", "", kernel)


def kernel_report(events: list[tuple[str, int, int]], steps: int, top: int) -> tuple[str, dict]:
    """The printed tables and the JSON fields for a trace of `steps` decode steps."""
    rows = common.kernel_table(events, steps)
    families = common.kernel_table([(kind(name), s, d) for name, s, d in events], steps)
    busy_us = common.events_busy_ns(events) / 1e3 / steps

    def table(first, rs):
        return common.format_table([first, "calls/step", "us/step", "us/call"], [
            [r["kernel"][:70], f"{r['calls_per']:.2f}", f"{r['us_per']:.1f}", f"{r['us_per_call']:.2f}"] for r in rs])

    text = (f"kernels     {len(events) / steps:.1f} a step, GPU busy {busy_us:.1f} us a step (traced without "
            f"CUDA graphs)\n\n{table('kernel', rows[:top])}\n\nby family (numeric suffixes dropped)\n"
            f"{table('family', families)}")
    return text, {"kernels_per_step": len(events) / steps, "busy_us_per_step": busy_us, "kernels": rows,
                  "families": families}


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="1b", choices=sorted(HF_CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--kv-format", default=None, help="kv_cache format (default: the model's dtype)")
    p.add_argument("--weights", default="bf16", choices=list(model.WEIGHT_FORMATS),
                   help="weight format (`model.quantize_weights`)")
    p.add_argument("--int8-matrices", nargs="+", default=None, choices=list(model.CONTRACTED_AXES),
                   help="with --weights int8: the matrices quantized (default all)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=30, help="kernel rows to print")
    p.add_argument("--copy-gib", type=float, default=1.0)
    p.add_argument("--out", default=None, help="directory for DATE-CARD-decode_profile-MODEL.json")
    args = p.parse_args(argv)

    env = common.environment()
    common.print_environment(env)
    torch_bw = common.torch_copy_bandwidth_in_child(int(args.copy_gib * 2**30))
    copy = common.copy_bandwidth(int(args.copy_gib * 2**30), torch_bw)
    bandwidth = copy["used_Bps"]

    cfg = ModelConfig.from_hf(HF_CONFIGS[args.model], dtype="bfloat16")
    params = jax.block_until_ready(model.quantize_weights(model.init_params(cfg, jax.random.key(0)), args.weights,
                                                                args.int8_matrices))
    weight_bytes = model.param_bytes(params)
    b, n = args.batch, args.new_tokens
    tokens = jnp.ones((b, args.prompt_len), jnp.int32)  # [B, T]
    lengths = jnp.full((b,), args.prompt_len, jnp.int32)
    kw = {"sampling": SamplingParams(0.0, 0, 1.0), "eos_ids": ()}

    def fresh():  # a state after prefill, ready for n new tokens
        return jax.block_until_ready(prefill(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=n,
                                             kv_format=args.kv_format, **kw))

    def run_decode(state):
        return jax.block_until_ready(decode(params, cfg, state, n, **kw))

    run_decode(fresh())  # compile
    times = []
    for _ in range(args.reps):
        state = fresh()
        t0 = time.perf_counter()
        run_decode(state)
        times.append(time.perf_counter() - t0)
    step_s = common.median(times) / (n - 1)
    roof_s = weight_bytes / bandwidth
    print(f"\n{args.model}, batch {b}, prompt {args.prompt_len}, {n} new tokens: {step_s * 1e3:.3f} ms/step "
          f"(weights {weight_bytes / 1e9:.3f} GB: roofline {roof_s * 1e3:.3f} ms at {bandwidth / 1e9:,.0f} GB/s, "
          f"{100 * roof_s / step_s:.0f}%)")

    result = {"benchmark": "decode_profile", "env": env, "args": vars(args), "copy_bandwidth": copy,
              "ms_per_step": step_s * 1e3, "weight_bytes": weight_bytes, "roofline_ms": roof_s * 1e3}
    states = [fresh(), fresh()]  # decode donates its state: one for the untraced call, one traced
    events = common.device_kernel_events(lambda: run_decode(states.pop()))
    if events is None:
        print("kernels     no GPU trace (CPU): step time only")
    else:
        text, fields = kernel_report(events, n - 1, args.top)  # the trace holds one decode: n - 1 steps
        print(text)
        result.update(fields)
    if args.out:
        day = datetime.date.today().isoformat()
        path = os.path.join(args.out, f"{day}-{common.card_slug(env)}-decode_profile-{args.model}"
                            f"{'' if args.weights == 'bf16' else '-' + args.weights}"
                            f"{'' if args.int8_matrices is None else '-some'}.json")
        common.save_json(path, result)
        print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
