#!/usr/bin/env python3
"""Quantized KV cache benchmark: quantize-and-append, decode attention, end-to-end decode.

All on one card in one run, beside the device copy bandwidth measured in the same run:

1. quantize-and-append (`pallas_kernels.quantize_append`) against XLA's `kv_cache.write`:
   GB/s = (bytes of new bf16 values read + bytes of packed data and scales written) /
   time, and % of copy bandwidth. Shapes: a 16k-token prefill append at Llama-3.1-8B
   heads (B=1, T=16384, K=8, D=128) and the seed's [2, 32, 2048, 64] (B=2, K=32,
   T=2048, D=64). One K-or-V store per call.
2. decode attention at Llama-3.1-8B heads (H=32, K=8, D=128), B in {1, 8}, context in
   {8k, 32k, 128k}: our flash-decode kernel reading bf16, int8 and int4 K/V, XLA's
   einsum reference (`attention.attention_reference` over a dense bf16 cache) and jax's
   Pallas `decode_attention.gqa`. Effective GB/s = K and V bytes (scales included) of
   the context / time.
3. end to end: `generation.decode` at the Llama-3.1-8B shape (random bf16 weights),
   batch 8, 32k context already in the cache, bf16 cache against int8 and int4:
   ms/step, tokens/s, and the roofline (weights + KV bytes) / copy bandwidth.

Kernel times are medians over `--reps` runs of a jitted loop of `--inner` dependent
calls (each call's input depends on the previous output, so none is hoisted), divided
by `--inner`: host dispatch is not in the figure.

Usage (repo root):  python3 bench/kv_quant.py --out bench/results/
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ollm_jax_bench_jit_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from ollm_jax import attention, kv_cache, model  # noqa: E402
from ollm_jax.config import ModelConfig  # noqa: E402
from ollm_jax.generation import DecodeState, decode  # noqa: E402
from ollm_jax.sampling import SamplingParams  # noqa: E402
from pallas_kernels import flash_decode, quantize_append  # noqa: E402

from bench.decode import HF_CONFIGS  # noqa: E402

H, K, D = 32, 8, 128  # Llama-3.1-8B attention heads


def time_loop(step, carry, *inputs, inner: int, reps: int) -> float:
    """Seconds per call of `step(carry, *inputs) -> carry`, run `inner` times in one jitted
    loop. The carry is donated; `inputs` (e.g. caches) are arguments, never closed over:
    as constants they would be baked into the executable."""
    def run(c, xs):  # the barrier keeps XLA from hoisting loop-invariant work (e.g. quantizing x)
        return jax.lax.fori_loop(0, inner, lambda i, c: step(jax.lax.optimization_barrier(c), *xs), c)

    loop = jax.jit(run, donate_argnums=0)
    carry = jax.block_until_ready(loop(carry, inputs))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(loop(carry, inputs))
        times.append(time.perf_counter() - t0)
    return common.median(times) / inner


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------ quantize-and-append


def bench_append(shape, fmt, args, bandwidth):
    """shape = (B, T, K, D, S): append T tokens at position 0 into a store of S slots."""
    b, t, k, d, s = shape
    f = kv_cache.parse_format(fmt)
    store = kv_cache.empty_store(f.k, (b, s, k, d), f.group)
    x = jax.random.normal(jax.random.key(0), (b, t, k, d), jnp.bfloat16)
    start = jnp.zeros((b,), jnp.int32)
    count = jnp.full((b,), t, jnp.int32)
    new = jax.eval_shape(lambda: kv_cache.encode(store, x))
    moved = x.size * x.dtype.itemsize + nbytes(new)
    impls = {
        "pallas": lambda c: (quantize_append.quantize_append(c[0], c[1], start, count), c[1]),
        "xla": lambda c: (quantize_append.quantize_append_reference(c[0], c[1], start, count), c[1]),
    }
    row = {"shape": list(shape), "format": fmt, "bytes_moved": moved}
    for name, fn in impls.items():
        try:
            fresh = (kv_cache.empty_store(f.k, (b, s, k, d), f.group), x + 0)  # the loop donates its carry
            sec = time_loop(fn, fresh, inner=args.inner, reps=args.reps)
            row[name] = {"us": sec * 1e6, "GBps": moved / sec / 1e9, "pct_copy": 100 * moved / sec / bandwidth}
        except Exception as e:
            traceback.print_exc()
            row[name] = {"error": repr(e)}
    return row


# ----------------------------------------------------------------------- decode attention


def bench_decode_attention(batch, length, args, bandwidth):
    key = jax.random.key(1)
    q = jax.random.normal(key, (batch, H, D), jnp.bfloat16)
    pos = jnp.full((batch,), length - 1, jnp.int32)
    rows = []
    # K and V are distinct buffers: one array as both would be read once from DRAM and once
    # from L2 (the same addresses, the same moment), at twice the true bandwidth.
    dense_k = jax.random.normal(jax.random.key(2), (batch, length, K, D), jnp.bfloat16)
    dense_v = jax.random.normal(jax.random.key(3), (batch, length, K, D), jnp.bfloat16)

    def chain(fn):  # next query depends on the previous output (never hoisted)
        return lambda qc, *kv: (qc + 1e-30 * fn(qc, *kv).astype(jnp.float32)).astype(qc.dtype)

    for fmt in args.formats:
        f = kv_cache.parse_format(fmt)
        k_store = kv_cache.encode(kv_cache.empty_store(f.k, (1, 1, K, D), f.group), dense_k)
        v_store = kv_cache.encode(kv_cache.empty_store(f.v, (1, 1, K, D), f.group), dense_v)
        kv_bytes = nbytes((k_store, v_store))
        impls = {f"ours {fmt}": (lambda qc, k, v: flash_decode.flash_decode(qc, k, v, pos), (k_store, v_store))}
        if fmt == "bf16":
            impls["xla einsum"] = (lambda qc, k, v: attention.attention_reference(
                qc[:, None], k, v, pos[:, None])[:, 0], (dense_k, dense_v))
            impls["jax gqa"] = (lambda qc, k, v: _jax_gqa(qc, k, v, pos + 1), (dense_k, dense_v))
        for name, (fn, kv) in impls.items():
            row = {"batch": batch, "context": length, "impl": name, "kv_bytes": kv_bytes}
            try:
                # time_loop donates its carry: each impl gets its own copy of q.
                sec = time_loop(chain(fn), jnp.copy(q), *kv, inner=args.inner, reps=args.reps)
                row.update(us=sec * 1e6, GBps=kv_bytes / sec / 1e9, pct_copy=100 * kv_bytes / sec / bandwidth)
            except Exception as e:
                traceback.print_exc()
                row["error"] = repr(e)
            print(f"  attn B={batch} L={length:>6} {name:<12} " + (
                f"{row['us']:9.1f} us  {row['GBps']:7,.0f} GB/s  {row['pct_copy']:5.1f}% of copy" if "us" in row
                else f"failed: {row['error'][:120]}"))
            rows.append(row)
    gc.collect()
    return rows


def _jax_gqa(q, k, v, kv_len):
    from jax.experimental.pallas.ops.gpu import decode_attention

    return decode_attention.gqa(q, k, v, kv_seq_len=kv_len, k_splits=64 if q.shape[0] == 1 else 16)


# ---------------------------------------------------------------------------- end to end


def bench_e2e(params, cfg, fmt, args, bandwidth):
    b, ctx, n = args.e2e_batch, args.e2e_context, args.e2e_tokens
    cache = kv_cache.create(cfg, b, ctx + n + 1, fmt)
    cache = kv_cache.set_lengths(cache, jnp.full((b,), ctx, jnp.int32))
    state = DecodeState(
        tokens=jnp.ones((b, n + 1), jnp.int32), num_tokens=jnp.ones((b,), jnp.int32),
        done=jnp.zeros((b,), bool), step=jnp.array(1, jnp.int32),
        prompt_lengths=jnp.full((b,), ctx, jnp.int32), cache=cache, key=jax.random.key(0))
    run = functools.partial(decode, params, cfg, sampling=SamplingParams(0.0, 0, 1.0), eos_ids=())
    state = jax.block_until_ready(run(state, 2))  # compile, one token
    t0 = time.perf_counter()
    state = jax.block_until_ready(run(state, n + 1))
    sec = (time.perf_counter() - t0) / (n - 1)
    weight_bytes = model.param_bytes(params)
    kv_bytes = kv_cache.bytes_per_token(cfg, fmt) * b * (ctx + n / 2)
    roof = (weight_bytes + kv_bytes) / bandwidth
    return {"format": fmt, "batch": b, "context": ctx, "ms_per_step": sec * 1e3, "tok_per_s": b / sec,
            "GBps": (weight_bytes + kv_bytes) / sec / 1e9, "roofline_ms": roof * 1e3, "pct_roofline": 100 * roof / sec,
            "kv_bytes_per_step": kv_bytes}


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["append", "attention", "e2e"])
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--context", nargs="+", type=int, default=[8192, 32768, 131072])
    p.add_argument("--e2e-batch", type=int, default=8)
    p.add_argument("--e2e-context", type=int, default=32768)
    p.add_argument("--e2e-tokens", type=int, default=33)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--out", default=None, help="directory for DATE-CARD-kv_quant.json")
    args = p.parse_args(argv)

    env = common.environment()
    common.print_environment(env)
    copy = common.copy_bandwidth(int(args.copy_gib * 2**30), common.torch_copy_bandwidth_in_child(int(args.copy_gib * 2**30)))
    bw = copy["used_Bps"]
    print(f"copy BW     jax x+1 {copy['jax_Bps'] / 1e9:,.0f} GB/s; torch copy_ "
          f"{(copy['torch_Bps'] or 0) / 1e9:,.0f} GB/s; using {bw / 1e9:,.0f} GB/s ({copy['source']})")
    result = {"benchmark": "kv_quant", "env": env, "args": vars(args), "copy_bandwidth": copy,
              "append": [], "attention": [], "e2e": []}
    out = None
    if args.out:
        out = os.path.join(args.out, f"{datetime.date.today().isoformat()}-{common.card_slug(env)}-kv_quant.json")

    def save():
        if out:
            common.save_json(out, result)

    if "append" in args.parts:
        print("\nquantize-and-append (one store, new bf16 values -> packed data + scales)")
        for shape in [(1, 16384, 8, 128, 32768), (2, 2048, 32, 64, 4096)]:
            for fmt in ["int8", "int4-g64", "int4-g128", "bf16"]:
                row = bench_append(shape, fmt, args, bw)
                result["append"].append(row)
                cells = "  ".join(
                    f"{n} " + (f"{row[n]['us']:8.1f} us {row[n]['GBps']:6,.0f} GB/s {row[n]['pct_copy']:5.1f}%"
                               if "us" in row[n] else "failed") for n in ("pallas", "xla"))
                print(f"  B,T,K,D={shape[:4]} {fmt:<10} {cells}")
                save()
    if "attention" in args.parts:
        print("\ndecode attention, H=32 K=8 D=128")
        for b in args.batch:
            for length in args.context:
                result["attention"] += bench_decode_attention(b, length, args, bw)
                save()
    if "e2e" in args.parts:
        cfg = ModelConfig.from_hf(HF_CONFIGS["8b"], dtype="bfloat16")
        params = jax.block_until_ready(model.init_params(cfg, jax.random.key(0)))
        print(f"\nend to end, Llama-3.1-8B shape, B={args.e2e_batch}, context {args.e2e_context}")
        for fmt in args.formats:
            try:
                row = bench_e2e(params, cfg, fmt, args, bw)
                print(f"  {fmt:<6} {row['ms_per_step']:.2f} ms/step  {row['tok_per_s']:,.0f} tok/s  "
                      f"{row['GBps']:,.0f} GB/s  {row['pct_roofline']:.1f}% of roofline ({row['roofline_ms']:.2f} ms)")
            except Exception as e:
                traceback.print_exc()
                row = {"format": fmt, "error": repr(e)}
            result["e2e"].append(row)
            save()
            gc.collect()
    if out:
        print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
