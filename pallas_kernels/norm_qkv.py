"""Fused decode projection: RMSNorm, the q/k/v GEMVs and RoPE in two kernels (measured;
used by the model only when asked for, with attention_impl="pallas").

In a decode step (a few rows: batch x new tokens) each of these is a tiny kernel, and a
small model pays for launches and tails more than for bytes: on an H200 the Llama-3.2-1B
step runs the norm's reduction, its scale, the q and the k+v GEMVs and two RoPE fusions
as six kernels a layer (about 13 us). Here two launches do it:

    partials: x [M, E] (x scale) @ w_q | w_k | w_v, one [BE, D] weight tile a program
              -> f32 partial sums [S, BM, NH, D] and partial sums of squares [S, BM]
    epilogue: per head, the partials added, times the RMSNorm factor rsqrt(mean(x^2) + eps),
              rounded, + bias, RoPE (q and k) -> q [M, H, D], k, v [M, K, D]

Every program of the first kernel loads one weight tile and no loop runs, so all the
weight bytes are requested at once. Measured inside the Llama-3.2-1B decode step on an
H200 (`bench/results/2026-11-27-h200-speculative-shapes.md`, session 5), the two take
9.5 + 2.9 us a layer, against about 13 us for the six XLA kernels they replace, but the
step as a whole ran 1.099 ms against 1.072 with XLA's path (its K/V append moves to the
Pallas append as well), so `attention_impl="auto"` keeps XLA's path. The partials stream
at 1.3 TB/s, a third of the memory's speed: that, not the launches, is what to fix. (A
one-kernel version with a loop over E per program, b290668, took 14.3 us.)

Rounding: the GEMV takes x * scale rounded to x's dtype and the norm factor multiplies
its f32 sum, where the model's XLA path (`norm_qkv_rope_reference`) rounds the normalised
x and then its scaled value; so the two differ by one rounding of each term and the
summation order. From the GEMV's rounded result on (bias, every RoPE product and sum,
each rounded to x's dtype) the steps are the same.

Dimensions: M rows (B x T), E hidden, H query heads, K KV heads, D head_dim, NH = H + 2K
heads (q heads first, then k, then v), BE hidden channels per program, S = E / BE
splits, BM rows padded (>= 16, the smallest mma).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

DEFAULT_BLOCK_E = 256
DEFAULT_NUM_WARPS = 4
MAX_ROWS = 64  # rows per launch: decode and speculative verification, not prefill


def supports(x: jax.Array, w_q: jax.Array, w_k: jax.Array) -> bool:
    """Whether the kernels take these shapes: x [M, E] with M <= MAX_ROWS, head_dim a
    power of 2 >= 32 and E a multiple of 16."""
    m, e = x.shape
    d = w_q.shape[2]
    return m <= MAX_ROWS and d >= 32 and d & (d - 1) == 0 and e % 16 == 0 and w_k.shape[2] == d


def _round(x: jax.Array, dtype) -> jax.Array:
    """x rounded to `dtype` and back to f32: one XLA op's result in that dtype."""
    return x.astype(dtype).astype(jnp.float32)


def _partials_kernel(x_ref, scale_ref, wq_ref, wk_ref, wv_ref, part_ref, ss_ref, *, heads: tuple[int, int],
                     block_e: int, block_m: int):
    # x_ref [M, E]; scale_ref [E]; wq_ref [E, H*D], wk_ref / wv_ref [E, K*D] (whole arrays)
    # part_ref [S, BM, NH, D] f32, ss_ref [S, BM] f32: this program's [BM, D] and [BM]
    h, k = heads
    m = x_ref.shape[0]
    d = part_ref.shape[3]
    f32 = jnp.float32
    head, s = pl.program_id(0), pl.program_id(1)
    e0 = s * block_e
    row_ok = jnp.arange(block_m, dtype=jnp.int32) < m  # [BM]
    x = plt.load(x_ref.at[pl.ds(0, block_m), pl.ds(e0, block_e)], mask=row_ok[:, None], other=0).astype(f32)
    xs = (x * scale_ref[pl.ds(e0, block_e)].astype(f32)[None, :]).astype(x_ref.dtype)  # [BM, BE]
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None  # f32: no TF32

    def project(w_ref, n):  # head n of this weight: columns [n*D, (n+1)*D)
        tile = w_ref[pl.ds(e0, block_e), pl.ds(n * d, d)]  # [BE, D]
        part_ref[s, :, head, :] = jnp.dot(xs, tile, preferred_element_type=f32, precision=precision)  # [BM, D]

    pl.when(head < h)(lambda: project(wq_ref, head))
    pl.when((head >= h) & (head < h + k))(lambda: project(wk_ref, head - h))
    pl.when(head >= h + k)(lambda: project(wv_ref, head - h - k))

    @pl.when(head == 0)
    def _():
        ss_ref[s, :] = jnp.sum(x * x, axis=1)  # [BM]


def _epilogue_kernel(part_ref, ss_ref, pos_ref, inv_ref, *rest, heads: tuple[int, int], e: int, eps: float,
                     has_bias: bool):
    # part_ref [S, BM, NH, D] f32, ss_ref [S, BM] f32; pos_ref [M] int32; inv_ref [D/2] f32
    # with bias: bq_ref [H*D], bk_ref / bv_ref [K*D]; outputs q_ref [M, H, D], k_ref / v_ref [M, K, D]
    biases, (q_ref, k_ref, v_ref) = (rest[:3], rest[3:]) if has_bias else ((None,) * 3, rest)
    h, k = heads
    splits, block_m, _, d = part_ref.shape
    m = q_ref.shape[0]
    half, dt, f32 = d // 2, q_ref.dtype, jnp.float32
    head = pl.program_id(0)
    row_ok = jnp.arange(block_m, dtype=jnp.int32) < m  # [BM]

    def total(c0):  # [BM, D/2]: channels [c0, c0 + D/2) of this head, summed over the splits
        acc = part_ref[0, :, head, pl.ds(c0, half)]
        for s in range(1, splits):
            acc += part_ref[s, :, head, pl.ds(c0, half)]
        return acc

    ss = ss_ref[0, :]  # [BM]
    for s in range(1, splits):
        ss += ss_ref[s, :]
    r = lax.rsqrt(ss / e + eps)[:, None]  # [BM, 1]: the RMSNorm factor
    y1, y2 = _round(total(0) * r, dt), _round(total(half) * r, dt)  # the GEMV's result in x's dtype

    def finish(b_ref, out_ref, n, rotate: bool):
        a1, a2 = y1, y2
        if b_ref is not None:
            a1 = _round(a1 + b_ref[pl.ds(n * d, half)].astype(f32)[None, :], dt)
            a2 = _round(a2 + b_ref[pl.ds(n * d + half, half)].astype(f32)[None, :], dt)
        if rotate:  # a1 cos - a2 sin, a2 cos + a1 sin, each product and sum rounded
            pos = plt.load(pos_ref.at[pl.ds(0, block_m)], mask=row_ok, other=0).astype(f32)  # [BM]
            angle = pos[:, None] * inv_ref[...][None, :]  # [BM, D/2]
            cos, sin = _round(jnp.cos(angle), dt), _round(jnp.sin(angle), dt)
            a1, a2 = (_round(_round(a1 * cos, dt) - _round(a2 * sin, dt), dt),
                      _round(_round(a2 * cos, dt) + _round(a1 * sin, dt), dt))
        mask = row_ok[:, None]
        plt.store(out_ref.at[pl.ds(0, block_m), n, pl.ds(0, half)], a1.astype(out_ref.dtype), mask=mask)
        plt.store(out_ref.at[pl.ds(0, block_m), n, pl.ds(half, half)], a2.astype(out_ref.dtype), mask=mask)

    bq, bk, bv = biases
    pl.when(head < h)(lambda: finish(bq, q_ref, head, rotate=True))
    pl.when((head >= h) & (head < h + k))(lambda: finish(bk, k_ref, head - h, rotate=True))
    pl.when(head >= h + k)(lambda: finish(bv, v_ref, head - h - k, rotate=False))


_KNOBS = ("eps", "block_e", "num_warps", "interpret")


@functools.partial(jax.jit, static_argnames=_KNOBS)
def norm_qkv_rope(
    x: jax.Array,
    norm_scale: jax.Array,
    w_q: jax.Array,
    w_k: jax.Array,
    w_v: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    biases: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    *,
    eps: float,
    block_e: int | None = None,
    num_warps: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RMSNorm(x) projected to q, k, v, with RoPE on q and k, in two kernels.

    Args:
      x: [M, E] the residual stream's rows (not normalised), M <= MAX_ROWS.
      norm_scale: [E] the RMSNorm weight.
      w_q: [E, H, D]; w_k, w_v: [E, K, D] (the model's layouts).
      positions: [M] int32, each row's position (RoPE angle = position x inv_freq).
      inv_freq: [D/2] f32 RoPE inverse frequencies (scaling already applied).
      biases: optional (b_q [H, D], b_k [K, D], b_v [K, D]) added before RoPE (Qwen2).
      eps: the RMSNorm epsilon.
      block_e: hidden channels per program of the first kernel (a power of 2 >= 16
        dividing E; default DEFAULT_BLOCK_E, or E's largest power-of-2 factor if smaller);
        num_warps: Triton's, for both kernels (default DEFAULT_NUM_WARPS).
      interpret: run in Pallas interpret mode (CPU).
    Returns:
      (q [M, H, D], k [M, K, D], v [M, K, D]) in x's dtype.
    """
    m, e = x.shape
    h, d = w_q.shape[1:]
    k = w_k.shape[1]
    if not supports(x, w_q, w_k) or w_q.shape[0] != e or w_k.shape != w_v.shape or w_k.shape[0] != e:
        raise ValueError(f"norm_qkv_rope takes x [M <= {MAX_ROWS}, E % 16 == 0], w_q [E, H, D], w_k = w_v "
                         f"[E, K, D] with D a power of 2 >= 32; got {x.shape=} {w_q.shape=} {w_k.shape=} "
                         f"{w_v.shape=}")
    if norm_scale.shape != (e,) or positions.shape != (m,) or inv_freq.shape != (d // 2,):
        raise ValueError(f"expected norm_scale [{e}], positions [{m}], inv_freq [{d // 2}]; got "
                         f"{norm_scale.shape=} {positions.shape=} {inv_freq.shape=}")
    block_e = block_e or min(DEFAULT_BLOCK_E, e & -e)
    if block_e < 16 or block_e & (block_e - 1) or e % block_e:
        raise ValueError(f"{block_e=} must be a power of 2 >= 16 dividing E = {e}")
    block_m = max(16, pl.next_power_of_2(m))
    splits, nh = e // block_e, h + 2 * k
    params = plt.CompilerParams(num_warps=num_warps or DEFAULT_NUM_WARPS, num_stages=1)
    part, ss = pl.pallas_call(
        functools.partial(_partials_kernel, heads=(h, k), block_e=block_e, block_m=block_m),
        out_shape=[jax.ShapeDtypeStruct((splits, block_m, nh, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, block_m), jnp.float32)],
        grid=(nh, splits),
        compiler_params=params,
        interpret=interpret,
        name="norm_qkv_partials",
    )(x, norm_scale, w_q.reshape(e, h * d), w_k.reshape(e, k * d), w_v.reshape(e, k * d))
    has_bias = biases is not None
    return pl.pallas_call(
        functools.partial(_epilogue_kernel, heads=(h, k), e=e, eps=float(eps), has_bias=has_bias),
        out_shape=[jax.ShapeDtypeStruct((m, h, d), x.dtype), jax.ShapeDtypeStruct((m, k, d), x.dtype),
                   jax.ShapeDtypeStruct((m, k, d), x.dtype)],
        grid=(nh,),
        compiler_params=params,
        interpret=interpret,
        name="norm_qkv_rope",
    )(part, ss, positions.astype(jnp.int32), inv_freq.astype(jnp.float32),
      *([b.reshape(-1) for b in biases] if has_bias else []))


def norm_qkv_rope_reference(x, norm_scale, w_q, w_k, w_v, positions, inv_freq, biases=None, *, eps):
    """`norm_qkv_rope` as the model's XLA path computes it (`ollm_jax.model`)."""
    from ollm_jax.model import rms_norm, rope  # the model imports the kernels

    xn = rms_norm(x, norm_scale, eps)  # [M, E]
    q = jnp.einsum("me,ehd->mhd", xn, w_q)  # [M, H, D]
    k = jnp.einsum("me,ekd->mkd", xn, w_k)  # [M, K, D]
    v = jnp.einsum("me,ekd->mkd", xn, w_v)
    if biases is not None:
        q, k, v = q + biases[0], k + biases[1], v + biases[2]
    pos = positions[:, None]  # [M, 1]: rope's [B, T] with T = 1
    return rope(q[:, None], pos, inv_freq)[:, 0], rope(k[:, None], pos, inv_freq)[:, 0], v


# ------------------------------------------------------------------------------- bench


def _bench(argv=None):  # pragma: no cover - GPU only
    """Busy time per call of the kernel (each knob set) beside XLA's path (the reference:
    norm, GEMVs and RoPE as XLA fuses them), and GB/s of the weights read."""
    import argparse
    import itertools
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import common

    p = argparse.ArgumentParser(description="Sweep norm_qkv_rope against XLA's path and the copy bandwidth.")
    p.add_argument("--shapes", nargs="+", default=["2048,32,8,64", "4096,32,8,128"], help="E,H,K,D")
    p.add_argument("--rows", default="1,5,8", help="comma list of M")
    p.add_argument("--block-e", default="128,256")  # the first kernel's split of E (512 spills)
    p.add_argument("--num-warps", default="4")
    p.add_argument("--copies", type=int, default=12, help="weight sets cycled per timed run (past L2)")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test (tiny shapes)")
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731

    env = common.environment()
    common.print_environment(env)
    copy_bw = common.jax_copy_bandwidth(1 << (20 if args.interpret else 30))
    print(f"ceiling     jax copy (x + 1) of a 1 GiB buffer: {copy_bw / 1e9:.0f} GB/s on {env['jax_device_kind']}")
    headers = ["E,H,K,D", "M", "impl", "block_e", "warps", "busy us", "GB/s", "% copy",
               "max|err|"]
    rows = []
    for shape, m in itertools.product(args.shapes, ints(args.rows)):
        e, h, k, d = ints(shape)
        key = jax.random.key(0)
        sets = []
        for i in range(args.copies):
            ks = jax.random.split(jax.random.fold_in(key, i), 6)
            sets.append((jax.random.normal(ks[0], (m, e), jnp.bfloat16), 1 + 0.1 * jax.random.normal(ks[1], (e,), jnp.bfloat16),
                         0.02 * jax.random.normal(ks[2], (e, h, d), jnp.bfloat16),
                         0.02 * jax.random.normal(ks[3], (e, k, d), jnp.bfloat16),
                         0.02 * jax.random.normal(ks[4], (e, k, d), jnp.bfloat16),
                         jax.random.randint(ks[5], (m,), 0, 100_000)))
        inv = 500000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
        nbytes = (h + 2 * k) * d * e * 2
        ref = jax.jit(lambda s, inv=inv: [norm_qkv_rope_reference(*a, inv, eps=1e-5) for a in s])
        want = ref(sets)[0]
        runs = [("xla", None, ref)]
        for be, w in itertools.product(*map(ints, (args.block_e, args.num_warps))):
            fn = functools.partial(norm_qkv_rope, eps=1e-5, block_e=be, num_warps=w, interpret=args.interpret)
            runs.append(("pallas", (be, w), jax.jit(lambda s, fn=fn, inv=inv: [fn(*a, inv) for a in s])))
        for impl, knobs, run in runs:
            try:
                got = run(sets)[0]
            except Exception as exc:  # a knob set the lowering rejects
                print(f"{shape} M={m} {knobs}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))) for g, r in zip(got, want))
            busy = common.device_busy_seconds(lambda run=run, sets=sets: run(sets), reps=3)
            us = None if busy is None else busy / args.copies * 1e6
            rows.append([shape, m, impl, *(knobs or ["-"] * 2), "-" if us is None else f"{us:.2f}",
                         "-" if us is None else f"{nbytes / us / 1e3:.0f}",
                         "-" if us is None else f"{100 * nbytes / us / 1e3 / (copy_bw / 1e9):.0f}", f"{err:.3g}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print("\nnorm_qkv_rope: busy us = GPU busy time per call in a profiler trace; GB/s = q, k, v weight bytes / "
          "busy time; % copy = of the jax copy bandwidth above; max|err| = against XLA's path (bf16 results)")
    print(common.format_table(headers, rows))


if __name__ == "__main__":  # pragma: no cover
    _bench()
