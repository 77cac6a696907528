"""Fused decode projection: RMSNorm, the q/k/v GEMVs and RoPE in one kernel (measured,
not dispatched).

In a decode step (a few rows: batch x new tokens) each of these is a tiny kernel, and a
small model pays for launches and tails more than for bytes: on an H200 the Llama-3.2-1B
step runs the norm's reduction, its scale, the q and the k+v GEMVs and two RoPE fusions
as six kernels a layer (about 13 us). This kernel does it in one launch: it reads x,
normalises it, streams the three weight matrices once and writes q, k and v rotated.

    x [M, E] --RMSNorm(scale)--> xn --@ w_q, w_k, w_v (+ bias)--> RoPE(q, k) --> q, k, v

Status (H200, 2026-11-27, `bench/results/2026-11-27-h200-speculative-shapes.md`): at the
1B shape it takes 14.3 us a call inside the decode step (0.88 TB/s of its 12.6 MB), no
faster than the six XLA kernels it replaces, so the model does not call it. Its 96
programs of two [BE, 16] weight tiles are too few and too narrow to stream at the
memory's speed; a split over E (partial sums combined by the last program) is the next
version to try.

Rounding follows the XLA path of `ollm_jax.model` step by step (normalise in f32, cast
to x's dtype, scale; the GEMV accumulates in f32 and rounds once; bias and every RoPE
multiply and add round to x's dtype), so the two differ only by the GEMV's summation
order; `norm_qkv_rope_reference` is that XLA path.

Layout: the weights stay as stored ([E, heads, D]; viewed as [E, heads * D], which is
free). RoPE pairs channel j with j + D/2, so a program owns BP channel pairs of one head:
columns [j0, j0 + BP) and [j0 + D/2, j0 + D/2 + BP), two [BE, BP] weight tiles per step
of its loop over E, and it rotates its own results. The grid is one program per BP
pairs of every q, k and v head (q heads first); v is not rotated. All M rows (padded to
16, the smallest mma) go through each program, so the weights are read once.

Dimensions: M rows (B x T), E hidden, H query heads, K KV heads, D head_dim, NH = H + 2K
heads in all, BP channel pairs per program, BE hidden channels per loop step, BM rows
padded (>= 16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

DEFAULT_BLOCK_P = 16
DEFAULT_BLOCK_E = 256
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
MAX_ROWS = 64  # rows per launch: decode and speculative verification, not prefill


def supports(x: jax.Array, w_q: jax.Array, w_k: jax.Array) -> bool:
    """Whether the kernel takes these shapes: x [M, E] with M <= MAX_ROWS, head_dim a
    power of 2 >= 32 and E a multiple of 16."""
    m, e = x.shape
    d = w_q.shape[2]
    return m <= MAX_ROWS and d >= 32 and d & (d - 1) == 0 and e % 16 == 0 and w_k.shape[2] == d


def _round(x: jax.Array, dtype) -> jax.Array:
    """x rounded to `dtype` and back to f32: one XLA op's result in that dtype."""
    return x.astype(dtype).astype(jnp.float32)


def _kernel(x_ref, scale_ref, pos_ref, inv_ref, wq_ref, wk_ref, wv_ref, *rest, heads: tuple[int, int],
            block_p: int, block_e: int, block_m: int, eps: float, has_bias: bool):
    # x_ref [M, E]; scale_ref [E]; pos_ref [M] int32; inv_ref [D/2] f32 (RoPE frequencies)
    # wq_ref [E, H*D], wk_ref / wv_ref [E, K*D]; with bias: bq_ref [H*D], bk_ref / bv_ref [K*D]
    # outputs q_ref [M, H, D], k_ref / v_ref [M, K, D] (whole arrays)
    biases, (q_ref, k_ref, v_ref) = (rest[:3], rest[3:]) if has_bias else ((None,) * 3, rest)
    h, k = heads
    m, e = x_ref.shape
    d = q_ref.shape[2]
    half, dt, f32 = d // 2, x_ref.dtype, jnp.float32
    per_head = half // block_p
    p = pl.program_id(0)
    head, j0 = p // per_head, (p % per_head) * block_p

    rows = jnp.arange(block_m, dtype=jnp.int32)  # [BM]
    row_ok = rows < m

    def x_chunk(e0):  # [BM, BE] f32, rows past M zero
        return plt.load(x_ref.at[pl.ds(0, block_m), pl.ds(e0, block_e)], mask=row_ok[:, None], other=0).astype(f32)

    def sum_squares(i, acc):  # [BM]
        xc = x_chunk(i * block_e)
        return acc + jnp.sum(xc * xc, axis=1)

    steps = e // block_e
    ss = lax.fori_loop(0, steps, sum_squares, jnp.zeros((block_m,), f32))
    r = lax.rsqrt(ss / e + eps)[:, None]  # [BM, 1]

    def project(w_ref, b_ref, out_ref, n, rotate: bool):
        """Head n of one weight (q, k or v): channel pairs [j0, j0 + BP)."""
        c1 = n * d + j0  # first-half columns [c1, c1 + BP); second half + D/2

        def body(i, carry):
            a1, a2 = carry
            e0 = i * block_e
            xn = _round(x_chunk(e0) * r, dt) * scale_ref[pl.ds(e0, block_e)].astype(f32)  # [BM, BE]
            xn = xn.astype(dt)
            t1 = w_ref[pl.ds(e0, block_e), pl.ds(c1, block_p)]  # [BE, BP]
            t2 = w_ref[pl.ds(e0, block_e), pl.ds(c1 + half, block_p)]
            return (a1 + jnp.dot(xn, t1, preferred_element_type=f32),
                    a2 + jnp.dot(xn, t2, preferred_element_type=f32))  # [BM, BP] each

        zeros = jnp.zeros((block_m, block_p), f32)
        a1, a2 = lax.fori_loop(0, steps, body, (zeros, zeros))
        y1, y2 = _round(a1, dt), _round(a2, dt)  # the GEMV's result in x's dtype
        if b_ref is not None:
            y1 = _round(y1 + b_ref[pl.ds(c1, block_p)].astype(f32)[None, :], dt)
            y2 = _round(y2 + b_ref[pl.ds(c1 + half, block_p)].astype(f32)[None, :], dt)
        if rotate:  # y1 cos - y2 sin, y2 cos + y1 sin, each product and sum rounded
            pos = plt.load(pos_ref.at[pl.ds(0, block_m)], mask=row_ok, other=0).astype(f32)  # [BM]
            angle = pos[:, None] * inv_ref[pl.ds(j0, block_p)][None, :]  # [BM, BP]
            cos, sin = _round(jnp.cos(angle), dt), _round(jnp.sin(angle), dt)
            y1, y2 = (_round(_round(y1 * cos, dt) - _round(y2 * sin, dt), dt),
                      _round(_round(y2 * cos, dt) + _round(y1 * sin, dt), dt))
        store_mask = row_ok[:, None]
        plt.store(out_ref.at[pl.ds(0, block_m), n, pl.ds(j0, block_p)], y1.astype(out_ref.dtype), mask=store_mask)
        plt.store(out_ref.at[pl.ds(0, block_m), n, pl.ds(j0 + half, block_p)], y2.astype(out_ref.dtype),
                  mask=store_mask)

    bq, bk, bv = biases

    @pl.when(head < h)
    def _():
        project(wq_ref, bq, q_ref, head, rotate=True)

    @pl.when((head >= h) & (head < h + k))
    def _():
        project(wk_ref, bk, k_ref, head - h, rotate=True)

    @pl.when(head >= h + k)
    def _():
        project(wv_ref, bv, v_ref, head - h - k, rotate=False)


_KNOBS = ("eps", "block_p", "block_e", "num_warps", "num_stages", "interpret")


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
    block_p: int | None = None,
    block_e: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RMSNorm(x) projected to q, k, v, with RoPE on q and k, in one kernel.

    Args:
      x: [M, E] the residual stream's rows (not normalised), M <= MAX_ROWS.
      norm_scale: [E] the RMSNorm weight.
      w_q: [E, H, D]; w_k, w_v: [E, K, D] (the model's layouts).
      positions: [M] int32, each row's position (RoPE angle = position x inv_freq).
      inv_freq: [D/2] f32 RoPE inverse frequencies (scaling already applied).
      biases: optional (b_q [H, D], b_k [K, D], b_v [K, D]) added before RoPE (Qwen2).
      eps: the RMSNorm epsilon.
      block_p: channel pairs per program (a power of 2 >= 16 dividing D/2; default
        DEFAULT_BLOCK_P); block_e: hidden channels per loop step (a power of 2 >= 16
        dividing E; default DEFAULT_BLOCK_E or E if smaller); num_warps, num_stages: Triton
        launch parameters.
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
    block_p = block_p or min(DEFAULT_BLOCK_P, d // 2)
    block_e = block_e or min(DEFAULT_BLOCK_E, e & -e)
    if block_p < 16 or (d // 2) % block_p or block_e < 16 or e % block_e:
        raise ValueError(f"{block_p=} must be >= 16 and divide D/2 = {d // 2}; {block_e=} must be >= 16 and "
                         f"divide E = {e}")
    block_m = max(16, pl.next_power_of_2(m))
    has_bias = biases is not None
    flat_bias = [b.reshape(-1) for b in biases] if has_bias else []
    kernel = functools.partial(_kernel, heads=(h, k), block_p=block_p, block_e=block_e, block_m=block_m,
                               eps=float(eps), has_bias=has_bias)
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((m, h, d), x.dtype), jax.ShapeDtypeStruct((m, k, d), x.dtype),
                   jax.ShapeDtypeStruct((m, k, d), x.dtype)],
        grid=((h + 2 * k) * (d // 2 // block_p),),
        compiler_params=plt.CompilerParams(num_warps=num_warps or DEFAULT_NUM_WARPS,
                                           num_stages=num_stages or DEFAULT_NUM_STAGES),
        interpret=interpret,
        name="norm_qkv_rope",
    )(x, norm_scale, positions.astype(jnp.int32), inv_freq.astype(jnp.float32), w_q.reshape(e, h * d),
      w_k.reshape(e, k * d), w_v.reshape(e, k * d), *flat_bias)


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
    p.add_argument("--block-p", default="16")
    p.add_argument("--block-e", default="128,256,512")
    p.add_argument("--num-warps", default="4")
    p.add_argument("--num-stages", default="3")
    p.add_argument("--copies", type=int, default=12, help="weight sets cycled per timed run (past L2)")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test (tiny shapes)")
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731

    env = common.environment()
    common.print_environment(env)
    copy_bw = common.jax_copy_bandwidth(1 << (20 if args.interpret else 30))
    print(f"ceiling     jax copy (x + 1) of a 1 GiB buffer: {copy_bw / 1e9:.0f} GB/s on {env['jax_device_kind']}")
    headers = ["E,H,K,D", "M", "impl", "block_p", "block_e", "warps", "stages", "busy us", "GB/s", "% copy",
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
        for bp, be, w, st in itertools.product(*map(ints, (args.block_p, args.block_e, args.num_warps,
                                                            args.num_stages))):
            fn = functools.partial(norm_qkv_rope, eps=1e-5, block_p=bp, block_e=be, num_warps=w, num_stages=st,
                                   interpret=args.interpret)
            runs.append(("pallas", (bp, be, w, st), jax.jit(lambda s, fn=fn, inv=inv: [fn(*a, inv) for a in s])))
        for impl, knobs, run in runs:
            try:
                got = run(sets)[0]
            except Exception as exc:  # a knob set the lowering rejects
                print(f"{shape} M={m} {knobs}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))) for g, r in zip(got, want))
            busy = common.device_busy_seconds(lambda run=run, sets=sets: run(sets), reps=3)
            us = None if busy is None else busy / args.copies * 1e6
            rows.append([shape, m, impl, *(knobs or ["-"] * 4), "-" if us is None else f"{us:.2f}",
                         "-" if us is None else f"{nbytes / us / 1e3:.0f}",
                         "-" if us is None else f"{100 * nbytes / us / 1e3 / (copy_bw / 1e9):.0f}", f"{err:.3g}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print("\nnorm_qkv_rope: busy us = GPU busy time per call in a profiler trace; GB/s = q, k, v weight bytes / "
          "busy time; % copy = of the jax copy bandwidth above; max|err| = against XLA's path (bf16 results)")
    print(common.format_table(headers, rows))


if __name__ == "__main__":  # pragma: no cover
    _bench()
