"""int8 weight-only matrix products for decode-sized steps (Pallas, Triton).

    y [M, N] = x [M, K] @ (scale [N] * W [N, K])^T,    M <= MAX_ROWS

with W as `ollm_jax.model.quantize_weights` stores it: int8 values packed four to a uint32
word along K in the KV cache's layout (`kv_cache.pack_int8`: byte c of word j is column
j + c K/4), words [N, K/4], and a float32 scale per output row.

Why a kernel: XLA's Triton GEMM converts an int8 (or fp8) operand inside the fusion but at
M = 1 it read such a matrix at 1.5-1.9 TB/s on an H200, below its 3.7 TB/s for bf16, so
the halved bytes came back as time (bench/results/2026-11-27-h200-speculative-shapes.md,
session 6). Here the words become fp16 with the int8 KV cache's lop3/prmt sequence
(`flash_decode.int8_words_to_fp16`, four values in about five instructions), x enters
the tensor cores as fp16 (clipped to +-65504, bf16's range beyond it), and the scale is
applied once per output. `gemv_int8_glu` reads the MLP's gate and up matrices in one
launch (the same rows of each against one load of x) and writes silu(gate) * up.

Measured on an H200 at M = 1 (`python -m pallas_kernels.gemv_int8`): the Llama-3.2-1B LM
head (128256 x 2048) in 69.8 us against 125.3 for XLA's bf16 dot (3.8 TB/s of int8); the
MLP matrices 8.3-9.4 us against 10.5-10.7; the attention projections (2048 or 512 x 2048)
slower than XLA's bf16 (5.3 against 4.0 us): short programs do not reach the bandwidth.

Grid (N / BN, S): program (i, s) reads rows [i BN, (i + 1) BN) of W and words
[s Kw / S, (s + 1) Kw / S) of each (Kw = K / 4), in steps of BKw words, four dots a step
(one per byte c, against x's columns c K/4 + word). With S = 1 it writes y in `out_dtype`;
with S > 1 it writes f32 partials [S, M, N], summed and scaled by XLA after. `transposed`
puts W's rows on the mma's M (acc [BN, Mp], x padded to Mp >= 8 rows) instead of x's
(acc [Mp, BN], Mp >= 16).

Dimensions: M rows of x, K contracted, N outputs, Kw = K / 4 words a row, BN rows and BKw
words per tile, S splits of K, Mp = M padded to the mma.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

import pallas_kernels  # noqa: F401  (filters the Triton deprecation warning)
from ollm_jax import kv_cache
from pallas_kernels.flash_decode import int8_words_to_fp16

MAX_ROWS = 16
FP16_MAX = 65504.0
TARGET_PROGRAMS = 512  # about 4 a streaming multiprocessor on an H100 / H200 (132)


class Config(NamedTuple):
    block_n: int
    block_kw: int
    num_splits: int
    num_warps: int
    num_stages: int
    transposed: int


def default_config(n: int, kw: int) -> Config:
    """16 rows a program (one warp: the mma's M), 64 words a step, and splits of K until the
    grid has TARGET_PROGRAMS programs: the best of part m of bench/gpu_session.sh for the
    Llama-3.2-1B matrices on an H200 (`raw/2026-11-27-h200-s6-d-gemv_sweep.log`)."""
    block_n, block_kw = 16, min(64, kw & -kw)
    splits = 1
    while (n // block_n) * splits < TARGET_PROGRAMS and kw % (2 * splits * block_kw) == 0:
        splits *= 2
    return Config(block_n, block_kw, splits, num_warps=1, num_stages=3, transposed=1)


def resolve_config(n: int, kw: int, *knobs: int | None) -> Config:
    """The knobs given (block_n, block_kw, num_splits, num_warps, num_stages, transposed),
    `default_config`'s for the others; warps follow block_n (one warp per 16 rows, the
    mma's M) unless given."""
    knobs = knobs + (None,) * (len(Config._fields) - len(knobs))
    cfg = Config(*(v if v is not None else dv for v, dv in zip(knobs, default_config(n, kw))))
    if knobs[3] is None:
        cfg = cfg._replace(num_warps=max(1, min(8, cfg.block_n // 16)))
    return cfg


def supports(x: jax.Array, words: jax.Array) -> bool:
    """Whether the kernel takes x [M, K], words [N, K/4]: M <= MAX_ROWS, N a multiple of 16
    and K/4 of 16."""
    m, k = x.shape
    n, kw = words.shape
    return m <= MAX_ROWS and k == 4 * kw and n % 16 == 0 and kw % 16 == 0


def _kernel(x_ref, *refs, m: int, quarter: int, block_kw: int, steps: int, scaled: bool, glu: bool,
            transposed: bool, interpret: bool):
    # x_ref [Mp, K] (rows >= M outside x: masked); then per matrix w_ref [BN, Kw / S] words
    # and s_ref [BN] (two with `glu`: gate, up); o_ref [Mp, BN] (rows >= M masked on
    # store), or the f32 partial of this split.
    *mats, o_ref = refs
    w_refs, s_refs = mats[0::2], mats[1::2]
    f32, mp = jnp.float32, x_ref.shape[0]
    bn = w_refs[0].shape[0]
    first = pl.program_id(1) * steps * block_kw  # this split's first word
    row_mask = None if mp == m else (jnp.arange(mp) < m)[:, None]  # [Mp, 1]

    def load_x(c, k0):  # x's columns c K/4 + word, fp16 [Mp, BKw]
        cols = pl.ds(c * quarter + first + k0, block_kw)
        x = x_ref[:, cols] if row_mask is None else plt.load(x_ref.at[:, cols], mask=row_mask, other=0)
        return jnp.clip(x.astype(f32), -FP16_MAX, FP16_MAX).astype(jnp.float16)

    def body(i, accs):
        k0 = pl.multiple_of(i * block_kw, block_kw)
        xs = [load_x(c, k0) for c in range(4)]  # one load of x's slices for every matrix
        out = []
        for w_ref, acc in zip(w_refs, accs):
            words = w_ref[:, pl.ds(k0, block_kw)]  # [BN, BKw] uint32
            for x_c, w_c in zip(xs, int8_words_to_fp16(words, interpret)):  # [BN, BKw] fp16: byte c, exact
                if transposed:
                    acc += jnp.dot(w_c, x_c.T, preferred_element_type=f32)  # [BN, Mp]
                else:
                    acc += jnp.dot(x_c, w_c.T, preferred_element_type=f32)  # [Mp, BN]
            out.append(acc)
        return tuple(out)

    zeros = jnp.zeros((bn, mp) if transposed else (mp, bn), f32)
    accs = jax.lax.fori_loop(0, steps, body, (zeros,) * len(w_refs))
    ys = [acc.T if transposed else acc for acc in accs]  # [Mp, BN] each
    if scaled:
        ys = [y * s_ref[...][None, :] for y, s_ref in zip(ys, s_refs)]
    if glu:  # silu(gate) * up, each rounded to the output dtype first as the model's XLA path
        gate, up = (y.astype(o_ref.dtype).astype(f32) for y in ys)
        ys = [(gate * jax.nn.sigmoid(gate)).astype(o_ref.dtype).astype(f32) * up]
    out = ys[0].astype(o_ref.dtype)
    if row_mask is None:
        o_ref[...] = out
    else:
        plt.store(o_ref.at[...], out, mask=row_mask)


def _check(x: jax.Array, words: jax.Array, scale: jax.Array, name: str) -> None:
    n = words.shape[0]
    if not supports(x, words) or words.dtype != jnp.uint32 or scale.shape != (n,):
        raise ValueError(f"{name} takes x [M <= {MAX_ROWS}, K], words uint32 [N % 16 == 0, K/4 % 16 == 0], "
                         f"scale [N]; got {x.shape=} {words.shape=} {words.dtype=} {scale.shape=}")


def _call(x, mats: tuple[tuple[jax.Array, jax.Array], ...], *, glu: bool, out_dtype, knobs: tuple,
          interpret: bool) -> jax.Array:
    """The kernel over (words, scale) pairs of one shape: one pair, or gate and up with `glu`."""
    m, k = x.shape
    n, kw = mats[0][0].shape
    cfg = resolve_config(n, kw, *knobs)
    per_split = kw // cfg.num_splits
    if n % cfg.block_n or kw % cfg.num_splits or per_split % cfg.block_kw or (glu and cfg.num_splits > 1):
        raise ValueError(f"{cfg}: block_n must divide N = {n}, and num_splits x block_kw the {kw} words a row"
                         + (" (one split with glu)" if glu else ""))
    mp = max(8 if cfg.transposed else 16, pl.next_power_of_2(m))
    scaled = cfg.num_splits == 1
    kernel = functools.partial(_kernel, m=m, quarter=kw, block_kw=cfg.block_kw, steps=per_split // cfg.block_kw,
                               scaled=scaled, glu=glu, transposed=bool(cfg.transposed), interpret=interpret)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    w_spec = pl.BlockSpec((cfg.block_n, per_split), lambda i, s: (i, s))
    s_spec = pl.BlockSpec((cfg.block_n,), lambda i, s: (i,))
    y = pl.pallas_call(
        kernel,
        grid=(n // cfg.block_n, cfg.num_splits),
        in_specs=[pl.BlockSpec((mp, k), lambda i, s: (0, 0))] + [w_spec, s_spec] * len(mats),
        out_specs=pl.BlockSpec((None, mp, cfg.block_n), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((cfg.num_splits, m, n), out_dtype if scaled else jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="gemv_int8_glu" if glu else "gemv_int8",
    )(x, *[a for words, scale in mats for a in (words, scale.astype(jnp.float32))])
    if scaled:
        return y[0]
    return (jnp.sum(y, axis=0) * mats[0][1]).astype(out_dtype)


_KNOBS = ("block_n", "block_kw", "num_splits", "num_warps", "num_stages", "transposed")


@functools.partial(jax.jit, static_argnames=("out_dtype", *_KNOBS, "interpret"))
def gemv_int8(
    x: jax.Array,
    words: jax.Array,
    scale: jax.Array,
    *,
    out_dtype=None,
    block_n: int | None = None,
    block_kw: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    transposed: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] @ (scale [N] * unpack(words) [N, K])^T -> [M, N] in `out_dtype` (default x's).

    Args:
      x: [M, K] bf16 / fp16 / f32, M <= MAX_ROWS.
      words: [N, K/4] uint32, int8 values packed along K (`kv_cache.pack_int8`).
      scale: [N] f32 per output row.
      block_n, block_kw, num_splits, num_warps, num_stages, transposed: tuning knobs
        (`Config`); None takes `resolve_config`'s.
      interpret: run in Pallas interpret mode (CPU tests).
    """
    _check(x, words, scale, "gemv_int8")
    knobs = (block_n, block_kw, num_splits, num_warps, num_stages, transposed)
    return _call(x, ((words, scale),), glu=False, out_dtype=out_dtype, knobs=knobs, interpret=interpret)


@functools.partial(jax.jit, static_argnames=(*_KNOBS, "interpret"))
def gemv_int8_glu(
    x: jax.Array,
    gate_words: jax.Array,
    gate_scale: jax.Array,
    up_words: jax.Array,
    up_scale: jax.Array,
    *,
    block_n: int | None = None,
    block_kw: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    transposed: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """silu(x @ gate^T) * (x @ up^T) -> [M, F] in x's dtype, both int8 matrices [F, K] read
    in one launch (a program reads the same rows of each, against one load of x).
    Arguments as `gemv_int8`'s; num_splits must be 1."""
    _check(x, gate_words, gate_scale, "gemv_int8_glu")
    _check(x, up_words, up_scale, "gemv_int8_glu")
    if gate_words.shape != up_words.shape:
        raise ValueError(f"gate {gate_words.shape} and up {up_words.shape} words differ")
    knobs = (block_n, block_kw, num_splits or 1, num_warps, num_stages, transposed)
    return _call(x, ((gate_words, gate_scale), (up_words, up_scale)), glu=True, out_dtype=None, knobs=knobs,
                 interpret=interpret)


def gemv_int8_reference(x: jax.Array, words: jax.Array, scale: jax.Array, *, out_dtype=None) -> jax.Array:
    """`gemv_int8` in plain JAX: the int8 matrix widened to x's dtype in an XLA dot, scaled after."""
    w = kv_cache.unpack_int8(words).astype(x.dtype)  # [N, K]
    y = jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32)
    return (y * scale).astype(out_dtype or x.dtype)


def gemv_int8_glu_reference(x, gate_words, gate_scale, up_words, up_scale) -> jax.Array:
    """`gemv_int8_glu` as the model's XLA path computes it."""
    gate = gemv_int8_reference(x, gate_words, gate_scale)
    return jax.nn.silu(gate) * gemv_int8_reference(x, up_words, up_scale)


# ------------------------------------------------------------------------------- bench

# The matrices of one Llama-3.2-1B decode step as gemv_int8 sees them: N, K.
SHAPES_1B = {"q": (2048, 2048), "k|v": (512, 2048), "o": (2048, 2048), "gate|up": (8192, 2048),
             "down": (2048, 8192), "lm_head": (128256, 2048)}


def _bench(argv=None):  # pragma: no cover - GPU only
    """Busy time per call of each knob set beside XLA's bf16 dot (the anchor) and XLA's dot
    of the widened int8 matrix (the reference), with GB/s of the bytes each reads."""
    import argparse
    import itertools
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import common

    p = argparse.ArgumentParser(description="Sweep gemv_int8 against XLA's bf16 and int8 dots.")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES_1B), help=f"names of {list(SHAPES_1B)} or N,K")
    p.add_argument("--rows", default="1,5", help="comma list of M")
    p.add_argument("--block-n", default="")  # empty: the default config's
    p.add_argument("--block-kw", default="")
    p.add_argument("--num-splits", default="")
    p.add_argument("--num-warps", default="")
    p.add_argument("--num-stages", default="")
    p.add_argument("--transposed", default="")
    p.add_argument("--glu", action="store_true", help="also gate|up as gemv_int8_glu (one matrix twice)")
    p.add_argument("--bytes-per-run", type=float, default=0.5, help="GB of weights cycled per timed run (past L2)")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test (tiny shapes)")
    args = p.parse_args(argv)
    knob_lists = [[None] if not s else [int(v) for v in s.split(",")] for s in
                  (args.block_n, args.block_kw, args.num_splits, args.num_warps, args.num_stages, args.transposed)]

    env = common.environment()
    common.print_environment(env)
    copy_bw = common.jax_copy_bandwidth(1 << (20 if args.interpret else 30))
    print(f"ceiling     jax copy (x + 1) of a 1 GiB buffer: {copy_bw / 1e9:.0f} GB/s on {env['jax_device_kind']}")
    headers = ["matrix", "N,K", "M", "impl", "BN,BKw,S,warps,stages,T", "busy us", "GB/s", "% copy", "max|err|"]
    rows = []
    for name, m in itertools.product(args.shapes, [int(v) for v in args.rows.split(",")]):
        n, k = SHAPES_1B[name] if name in SHAPES_1B else map(int, name.split(","))
        copies = max(2, min(64, int(args.bytes_per_run * 1e9 / (n * k))))
        key = jax.random.key(n + k)
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        sets = []
        for i in range(copies):
            ki = jax.random.fold_in(key, i)
            w = 0.02 * jax.random.normal(ki, (n, k), jnp.bfloat16)
            q = jnp.clip(jnp.round(w.astype(jnp.float32) / 0.02 * 40), -127, 127).astype(jnp.int8)
            sets.append((w, kv_cache.pack_int8(q), jnp.full((n,), 0.02 / 40, jnp.float32)))
        jax.block_until_ready(sets)
        def xla_bf16(s, x):
            return [jnp.einsum("mk,nk->mn", x, w) for w, _, _ in s]

        def xla_int8(s, x):
            return [gemv_int8_reference(x, wd, sc) for _, wd, sc in s]

        def pairs(s):  # (gate, up) = consecutive copies: two different matrices, as in the model
            return zip(s, s[1:] + s[:1])

        def xla_bf16_glu(s, x):
            return [jax.nn.silu(jnp.einsum("mk,nk->mn", x, g[0])) * jnp.einsum("mk,nk->mn", x, u[0])
                    for g, u in pairs(s)]

        def pallas_glu(s, x):
            return [gemv_int8_glu(x, g[1], g[2], u[1], u[2], interpret=args.interpret) for g, u in pairs(s)]

        want = jax.jit(xla_int8)(sets, x)[0]
        runs = [("xla bf16", None, xla_bf16, 2 * n * k), ("xla int8", None, xla_int8, n * k)]
        if name == "gate|up" and args.glu:  # gate and up in one launch, against XLA's fusion of the two
            runs += [("xla bf16 glu", None, xla_bf16_glu, 4 * n * k),
                     ("pallas glu", resolve_config(n, k // 4, None, None, 1), pallas_glu, 2 * n * k)]
        for knobs in itertools.product(*knob_lists):
            fn = functools.partial(gemv_int8, block_n=knobs[0], block_kw=knobs[1], num_splits=knobs[2],
                                   num_warps=knobs[3], num_stages=knobs[4], transposed=knobs[5],
                                   interpret=args.interpret)
            runs.append(("pallas", resolve_config(n, k // 4, *knobs),
                         lambda s, x, fn=fn: [fn(x, wd, sc) for _, wd, sc in s], n * k))
        for impl, knobs, fn, nbytes in runs:
            run = jax.jit(fn)
            try:
                got = run(sets, x)[0]
            except Exception as exc:  # a knob set the lowering rejects
                print(f"{name} M={m} {knobs}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            err = jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
            err = float("nan") if "glu" in impl else float(err)  # glu: silu(gate) * up, not the plain product
            busy = common.device_busy_seconds(lambda run=run, sets=sets, x=x: run(sets, x), reps=3)
            us = None if busy is None else busy / copies * 1e6
            rows.append([name, f"{n},{k}", m, impl, "-" if knobs is None else ",".join(map(str, knobs)),
                         "-" if us is None else f"{us:.2f}", "-" if us is None else f"{nbytes / us / 1e3:.0f}",
                         "-" if us is None else f"{100 * nbytes / us / 1e3 / (copy_bw / 1e9):.0f}", f"{err:.3g}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print("\ngemv_int8: busy us = GPU busy time per call in a profiler trace; GB/s = weight bytes read (bf16 for the "
          "anchor, int8 otherwise) / busy time; % copy = of the jax copy bandwidth above; max|err| = against XLA's "
          "int8 dot")
    print(common.format_table(headers, rows))


if __name__ == "__main__":  # pragma: no cover
    _bench()
