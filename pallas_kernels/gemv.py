"""Weight-only int8 and int4 matrix products for decode-sized steps (Pallas, Triton).

    y [M, N] = x [M, K] @ W [N, K]^T,    M <= MAX_ROWS

with W as `ollm_jax.model.quantize_weights` stores it, K packed into words along the
rows in the KV cache's layouts (word j holds columns j + c K/4, one per quarter c):

- int8: words uint32 [N, K/4] (`kv_cache.pack_int8`), symmetric, W = scale [N] (f32) x n.
- int4: words uint16 [N, K/4] (`kv_cache.pack_int4`), asymmetric per group of G columns
  (G divides K/4, so a group lies in one quarter), W = scale x n + zero with scale and
  zero fp16 [K/G, N]: transposed, so that one step's row of each is one contiguous load.

Why a kernel: XLA's Triton GEMM converts an int8 (or fp8) operand inside the fusion but at
M = 1 it read such a matrix at 1.5-1.9 TB/s on an H200, below its 3.7 TB/s for bf16, so
the halved bytes came back as time (bench/results/2026-11-27-h200-speculative-shapes.md,
session 6). Here the words become fp16 in registers with the KV cache's lop3/prmt
sequences (`flash_decode.int8_words_to_fp16` and `int4_words_to_fp16`, about 1.5 and
1.25 instructions a value), x enters the tensor cores as fp16 (clipped to +-65504,
bf16's range beyond it), and the scales are applied to the dot's result: once per output
for int8; for int4 once per group, as scale (x . n) + zero sum(x) over the group's
columns. `gemv_glu` reads the MLP's gate and up matrices in one launch (the same rows of
each against one load of x) and writes silu(gate) * up.

Measured on an H200 at M = 1 (`python -m pallas_kernels.gemv`): the Llama-3.2-1B LM head
(128256 x 2048) in int8 in 69.8 us against 125.3 for XLA's bf16 dot (3.8 TB/s of int8);
the MLP matrices 8.3-9.4 us against 10.5-10.7; the attention projections (2048 or 512 x
2048) slower than XLA's bf16 (5.3 against 4.0 us): short programs do not reach the
bandwidth. int4: see bench/results/2026-11-27-h200-speculative-shapes.md, session 7.

Grid (N / BN, S): program (i, s) reads rows [i BN, (i + 1) BN) of W and words
[s Kw / S, (s + 1) Kw / S) of each (Kw = K / 4), in steps of BKw words, four dots a step
(one per quarter c, against x's columns c K/4 + word). With S = 1 it writes y in
`out_dtype`; with S > 1 it writes f32 partials [S, M, N], summed (and for int8 scaled) by
XLA after. `transposed` puts W's rows on the mma's M (acc [BN, Mp], x padded to Mp >= 8
rows) instead of x's (acc [Mp, BN], Mp >= 16).

Dimensions: M rows of x, K contracted, N outputs, Kw = K / 4 words a row, G int4 columns a
group, BN rows and BKw words per tile (int4: BKw divides G, one group a quarter's step),
S splits of K, Mp = M padded to the mma.
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
from pallas_kernels.flash_decode import int4_words_to_fp16, int8_words_to_fp16

MAX_ROWS = 16
FP16_MAX = 65504.0
TARGET_PROGRAMS = 512  # about 4 a streaming multiprocessor on an H100 / H200 (132)
WORD_DTYPES = {"int8": jnp.uint32, "int4": jnp.uint16}


class Config(NamedTuple):
    block_n: int
    block_kw: int
    num_splits: int
    num_warps: int
    num_stages: int
    transposed: int


def kind_of(zero: jax.Array | None) -> str:
    """The format of a (words, scale, zero) matrix: int4 has zero points, int8 not."""
    return "int8" if zero is None else "int4"


def default_config(n: int, kw: int, kind: str = "int8", group: int | None = None) -> Config:
    """16 rows a program (one warp: the mma's M), 256 bytes of a row a step (64 int8 words,
    128 int4 words, at most a group), and splits of K until the grid has TARGET_PROGRAMS
    programs: for int8 the best of part m of bench/gpu_session.sh for the Llama-3.2-1B
    matrices on an H200 (`raw/2026-11-27-h200-s6-d-gemv_sweep.log`)."""
    block_n = 16
    block_kw = min(64 if kind == "int8" else 128, kw & -kw, (group or kw) & -(group or kw))
    splits = 1
    while (n // block_n) * splits < TARGET_PROGRAMS and kw % (2 * splits * block_kw) == 0:
        splits *= 2
    return Config(block_n, block_kw, splits, num_warps=1, num_stages=3, transposed=1)


def resolve_config(n: int, kw: int, knobs: tuple = (), kind: str = "int8", group: int | None = None) -> Config:
    """The knobs given (block_n, block_kw, num_splits, num_warps, num_stages, transposed),
    `default_config`'s for the others; warps follow block_n (one warp per 16 rows, the
    mma's M) unless given."""
    knobs = tuple(knobs) + (None,) * (len(Config._fields) - len(knobs))
    default = default_config(n, kw, kind, group)
    cfg = Config(*(v if v is not None else dv for v, dv in zip(knobs, default)))
    if knobs[3] is None:
        cfg = cfg._replace(num_warps=max(1, min(8, cfg.block_n // 16)))
    return cfg


def _group(words: jax.Array, scale: jax.Array) -> int:
    """int4 columns a group: K / the scale's rows."""
    return 4 * words.shape[1] // scale.shape[0]


def supports(x: jax.Array, words: jax.Array, scale: jax.Array, zero: jax.Array | None = None) -> bool:
    """Whether the kernel takes x [M, K] with this matrix: M <= MAX_ROWS, N a multiple of
    16, K/4 of 16; int4: G a multiple of 16 dividing K/4, K/G a power of two."""
    m, k = x.shape
    n, kw = words.shape
    ok = m <= MAX_ROWS and k == 4 * kw and n % 16 == 0 and kw % 16 == 0
    if zero is None or not ok:
        return ok
    groups = scale.shape[0]
    return k % groups == 0 and (kw * 4 // groups) % 16 == 0 and kw % (k // groups) == 0 and groups & (groups - 1) == 0


def _kernel(x_ref, *refs, kind: str, m: int, quarter: int, block_kw: int, steps: int, group: int, scaled: bool,
            glu: bool, transposed: bool, interpret: bool):
    # x_ref [Mp, K] (rows >= M outside x: masked); then per matrix (gate and up with
    # `glu`) w_ref [BN, Kw / S] words and, int8: s_ref [BN] f32; int4: s_ref, z_ref
    # [K/G, BN] fp16 (every group of the row block); o_ref [Mp, BN] (rows >= M masked on
    # store), or the f32 partial of this split.
    *flat, o_ref = refs
    per = 2 if kind == "int8" else 3
    mats = [flat[i : i + per] for i in range(0, len(flat), per)]
    f32, mp = jnp.float32, x_ref.shape[0]
    bn = mats[0][0].shape[0]
    first = pl.program_id(1) * steps * block_kw  # this split's first word
    row_mask = None if mp == m else (jnp.arange(mp) < m)[:, None]  # [Mp, 1]

    def load_x(c, k0):  # x's columns c K/4 + word, fp16 [Mp, BKw]
        cols = pl.ds(c * quarter + first + k0, block_kw)
        x = x_ref[:, cols] if row_mask is None else plt.load(x_ref.at[:, cols], mask=row_mask, other=0)
        return jnp.clip(x.astype(f32), -FP16_MAX, FP16_MAX).astype(jnp.float16)

    def dot(w_c, x_c):  # [BN, BKw] x [Mp, BKw] -> f32 [BN, Mp] or [Mp, BN]
        if transposed:
            return jnp.dot(w_c, x_c.T, preferred_element_type=f32)
        return jnp.dot(x_c, w_c.T, preferred_element_type=f32)

    def per_output(v):  # f32 [BN] -> broadcastable against the accumulator
        return v[:, None] if transposed else v[None, :]

    def body(i, accs):
        k0 = pl.multiple_of(i * block_kw, block_kw)
        xs = [load_x(c, k0) for c in range(4)]  # one load of x's slices for every matrix
        if kind == "int4":  # sum(x) over each quarter's columns of this step (one group)
            sums = [jnp.sum(x_c.astype(f32), axis=1) for x_c in xs]  # [Mp] each
            sums = [v[None, :] if transposed else v[:, None] for v in sums]  # against the accumulator
        out = []
        for (w_ref, *scale_refs), acc in zip(mats, accs):
            words = w_ref[:, pl.ds(k0, block_kw)]  # [BN, BKw] uint32 / uint16
            if kind == "int8":
                for x_c, w_c in zip(xs, int8_words_to_fp16(words, interpret)):  # fp16 [BN, BKw]: byte c, exact
                    acc += dot(w_c, x_c)
            else:
                s_ref, z_ref = scale_refs
                for c, (x_c, w_c) in enumerate(zip(xs, int4_words_to_fp16(words, interpret))):  # n, or 16 n (odd c)
                    g = (c * quarter + first + k0) // group  # the group of this quarter's step
                    scale = s_ref[pl.ds(g, 1), :][0].astype(f32) * (1 / 16 if c % 2 else 1)  # [BN]
                    zero = z_ref[pl.ds(g, 1), :][0].astype(f32)
                    acc += dot(w_c, x_c) * per_output(scale) + per_output(zero) * sums[c]
            out.append(acc)
        return tuple(out)

    zeros = jnp.zeros((bn, mp) if transposed else (mp, bn), f32)
    accs = jax.lax.fori_loop(0, steps, body, (zeros,) * len(mats))
    ys = [acc.T if transposed else acc for acc in accs]  # [Mp, BN] each
    if kind == "int8" and scaled:
        ys = [y * s_ref[...][None, :] for y, (_, s_ref) in zip(ys, mats)]
    if glu:  # silu(gate) * up, each rounded to the output dtype first as the model's XLA path
        gate, up = (y.astype(o_ref.dtype).astype(f32) for y in ys)
        ys = [(gate * jax.nn.sigmoid(gate)).astype(o_ref.dtype).astype(f32) * up]
    out = ys[0].astype(o_ref.dtype)
    if row_mask is None:
        o_ref[...] = out
    else:
        plt.store(o_ref.at[...], out, mask=row_mask)


def _check(x: jax.Array, mat: tuple, name: str) -> None:
    words, scale, zero = mat
    n, kw = words.shape
    kind = kind_of(zero)
    if kind == "int8":
        want = f"words uint32 [N % 16 == 0, K/4 % 16 == 0], scale [N]"
        ok = words.dtype == jnp.uint32 and scale.shape == (n,)
    else:
        want = ("words uint16 [N % 16 == 0, K/4 % 16 == 0], scale and zero [K/G, N] with G a multiple of 16 "
                "dividing K/4 and K/G a power of two")
        ok = words.dtype == jnp.uint16 and scale.ndim == 2 and scale.shape[1] == n and zero.shape == scale.shape
    if not (ok and supports(x, words, scale, zero)):
        raise ValueError(f"{name} ({kind}) takes x [M <= {MAX_ROWS}, K], {want}; got {x.shape=} {words.shape=} "
                         f"{words.dtype=} {scale.shape=}" + ("" if zero is None else f" {zero.shape=}"))


def _call(x, mats: tuple[tuple, ...], *, glu: bool, out_dtype, knobs: tuple, interpret: bool) -> jax.Array:
    """The kernel over (words, scale, zero) matrices of one shape and format: one, or gate
    and up with `glu`."""
    m, k = x.shape
    words0, scale0, zero0 = mats[0]
    n, kw = words0.shape
    kind = kind_of(zero0)
    group = _group(words0, scale0) if kind == "int4" else None
    cfg = resolve_config(n, kw, knobs, kind, group)
    per_split = kw // cfg.num_splits
    if (n % cfg.block_n or kw % cfg.num_splits or per_split % cfg.block_kw or (glu and cfg.num_splits > 1)
            or (group and group % cfg.block_kw)):
        raise ValueError(f"{cfg}: block_n must divide N = {n}, and num_splits x block_kw the {kw} words a row"
                         + (" (one split with glu)" if glu else "") + (f"; block_kw the group {group}" if group else ""))
    mp = max(8 if cfg.transposed else 16, pl.next_power_of_2(m))
    scaled = kind == "int4" or cfg.num_splits == 1
    kernel = functools.partial(_kernel, kind=kind, m=m, quarter=kw, block_kw=cfg.block_kw,
                               steps=per_split // cfg.block_kw, group=group or 0, scaled=scaled, glu=glu,
                               transposed=bool(cfg.transposed), interpret=interpret)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    specs = [pl.BlockSpec((cfg.block_n, per_split), lambda i, s: (i, s))]
    if kind == "int8":
        specs.append(pl.BlockSpec((cfg.block_n,), lambda i, s: (i,)))
        operands = [a for words, scale, _ in mats for a in (words, scale.astype(jnp.float32))]
    else:  # every group of the row block: a split reads its own through the group index
        specs += [pl.BlockSpec((scale0.shape[0], cfg.block_n), lambda i, s: (0, i))] * 2
        operands = [a for mat in mats for a in mat]
    y = pl.pallas_call(
        kernel,
        grid=(n // cfg.block_n, cfg.num_splits),
        in_specs=[pl.BlockSpec((mp, k), lambda i, s: (0, 0))] + specs * len(mats),
        out_specs=pl.BlockSpec((None, mp, cfg.block_n), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((cfg.num_splits, m, n), out_dtype if cfg.num_splits == 1 else jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"gemv_{kind}_glu" if glu else f"gemv_{kind}",
    )(x, *operands)
    if cfg.num_splits == 1:
        return y[0]
    y = jnp.sum(y, axis=0)
    return (y if scaled else y * scale0).astype(out_dtype)


_KNOBS = ("block_n", "block_kw", "num_splits", "num_warps", "num_stages", "transposed")


@functools.partial(jax.jit, static_argnames=("out_dtype", *_KNOBS, "interpret"))
def gemv(
    x: jax.Array,
    words: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None = None,
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
    """x [M, K] @ W^T -> [M, N] in `out_dtype` (default x's), W [N, K] int8 or int4.

    Args:
      x: [M, K] bf16 / fp16 / f32, M <= MAX_ROWS.
      words: int8: [N, K/4] uint32 (`kv_cache.pack_int8`); int4: [N, K/4] uint16
        (`kv_cache.pack_int4`).
      scale: int8: [N] f32 per output row; int4: [K/G, N] fp16 per group.
      zero: int4 only: [K/G, N] fp16 per group (None: int8).
      block_n, block_kw, num_splits, num_warps, num_stages, transposed: tuning knobs
        (`Config`); None takes `resolve_config`'s.
      interpret: run in Pallas interpret mode (CPU tests).
    """
    _check(x, (words, scale, zero), "gemv")
    knobs = (block_n, block_kw, num_splits, num_warps, num_stages, transposed)
    return _call(x, ((words, scale, zero),), glu=False, out_dtype=out_dtype, knobs=knobs, interpret=interpret)


@functools.partial(jax.jit, static_argnames=(*_KNOBS, "interpret"))
def gemv_glu(
    x: jax.Array,
    gate: tuple,
    up: tuple,
    *,
    block_n: int | None = None,
    block_kw: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    transposed: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """silu(x @ gate^T) * (x @ up^T) -> [M, F] in x's dtype, gate and up (words, scale,
    zero) matrices [F, K] of one format read in one launch (a program reads the same rows
    of each, against one load of x). Arguments as `gemv`'s; num_splits must be 1."""
    gate, up = tuple(gate) + (None,) * (3 - len(gate)), tuple(up) + (None,) * (3 - len(up))
    _check(x, gate, "gemv_glu")
    _check(x, up, "gemv_glu")
    if jax.tree.map(jnp.shape, gate) != jax.tree.map(jnp.shape, up):
        raise ValueError(f"gate {jax.tree.map(jnp.shape, gate)} and up {jax.tree.map(jnp.shape, up)} differ")
    knobs = (block_n, block_kw, num_splits or 1, num_warps, num_stages, transposed)
    return _call(x, (gate, up), glu=True, out_dtype=None, knobs=knobs, interpret=interpret)


def dequantize(words: jax.Array, scale: jax.Array, zero: jax.Array | None = None) -> jax.Array:
    """The matrix [N, K] in float32 (exact: every int8 value, int4 n x scale + zero)."""
    if zero is None:
        return kv_cache.unpack_int8(words).astype(jnp.float32) * scale.astype(jnp.float32)[:, None]
    return kv_cache.dequantize_int4(words, scale.T, zero.T, jnp.float32)


def gemv_reference(x: jax.Array, words: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *,
                   out_dtype=None) -> jax.Array:
    """`gemv` in plain JAX: int8 widened to x's dtype in an XLA dot, scaled after; int4
    dequantized to float32 first."""
    if zero is None:
        w = kv_cache.unpack_int8(words).astype(x.dtype)  # [N, K]
        y = jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32) * scale
    else:
        y = jnp.einsum("mk,nk->mn", x.astype(jnp.float32), dequantize(words, scale, zero))
    return y.astype(out_dtype or x.dtype)


def gemv_glu_reference(x: jax.Array, gate: tuple, up: tuple) -> jax.Array:
    """`gemv_glu` as the model's XLA path computes it."""
    return jax.nn.silu(gemv_reference(x, *gate)) * gemv_reference(x, *up)


# ------------------------------------------------------------------------------- bench

# The matrices of one Llama-3.2-1B decode step as gemv sees them: N, K.
SHAPES_1B = {"q": (2048, 2048), "k|v": (512, 2048), "o": (2048, 2048), "gate|up": (8192, 2048),
             "down": (2048, 8192), "lm_head": (128256, 2048)}


def _random_matrix(key: jax.Array, n: int, k: int, kind: str, group: int):
    """(bf16 W [N, K], (words, scale, zero) of it in `kind`)."""
    w = 0.02 * jax.random.normal(key, (n, k), jnp.bfloat16)
    if kind == "int8":
        q = jnp.clip(jnp.round(w.astype(jnp.float32) / 0.02 * 40), -127, 127).astype(jnp.int8)
        return w, (kv_cache.pack_int8(q), jnp.full((n,), 0.02 / 40, jnp.float32), None)
    words, scale, zero = kv_cache.quantize_int4(w, group)
    return w, (words, scale.T, zero.T)


def _bench(argv=None):  # pragma: no cover - GPU only
    """Busy time per call of each knob set beside XLA's bf16 dot (the anchor) and XLA's dot
    of the dequantized matrix (the reference), with GB/s of the bytes each reads."""
    import argparse
    import itertools
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import common

    p = argparse.ArgumentParser(description="Sweep gemv (int8, int4) against XLA's bf16 dot and its reference.")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES_1B), help=f"names of {list(SHAPES_1B)} or N,K")
    p.add_argument("--formats", default="int8", help="comma list of int8, int4")
    p.add_argument("--group", type=int, default=128, help="int4 columns a group")
    p.add_argument("--rows", default="1,5", help="comma list of M")
    p.add_argument("--block-n", default="")  # empty: the default config's
    p.add_argument("--block-kw", default="")
    p.add_argument("--num-splits", default="")
    p.add_argument("--num-warps", default="")
    p.add_argument("--num-stages", default="")
    p.add_argument("--transposed", default="")
    p.add_argument("--glu", action="store_true", help="also gate|up as gemv_glu (gate and up: two copies)")
    p.add_argument("--no-anchor", action="store_true", help="leave out XLA's bf16 dots")
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
        dense = [0.02 * jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) for i in range(copies)]
        runs = []
        if not args.no_anchor:
            runs.append(("xla bf16", None, dense, lambda s, x: [jnp.einsum("mk,nk->mn", x, w) for w in s], 2 * n * k))
            if name == "gate|up" and args.glu:  # against XLA's fusion of the two products
                runs.append(("xla bf16 glu", None, dense, lambda s, x: [
                    jax.nn.silu(jnp.einsum("mk,nk->mn", x, g)) * jnp.einsum("mk,nk->mn", x, u)
                    for g, u in zip(s, s[1:] + s[:1])], 4 * n * k))
        for kind in args.formats.split(","):
            group = min(args.group, k // 4)
            mats = [_random_matrix(jax.random.fold_in(key, i), n, k, kind, group)[1] for i in range(copies)]
            nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(mats[0]))
            runs.append((f"xla {kind}", None, mats, lambda s, x: [gemv_reference(x, *mat) for mat in s], nbytes))
            if name == "gate|up" and args.glu:  # gate and up = consecutive copies: two matrices, as in the model
                runs.append((f"pallas {kind} glu", resolve_config(n, k // 4, (None, None, 1), kind, group), mats,
                             lambda s, x: [gemv_glu(x, g, u, interpret=args.interpret) for g, u in zip(s, s[1:] + s[:1])],
                             2 * nbytes))
            for knobs in itertools.product(*knob_lists):
                fn = functools.partial(gemv, block_n=knobs[0], block_kw=knobs[1], num_splits=knobs[2],
                                       num_warps=knobs[3], num_stages=knobs[4], transposed=knobs[5],
                                       interpret=args.interpret)
                runs.append((f"pallas {kind}", resolve_config(n, k // 4, knobs, kind, group), mats,
                             lambda s, x, fn=fn: [fn(x, *mat) for mat in s], nbytes))
        jax.block_until_ready([r[2] for r in runs])
        for impl, knobs, sets, fn, nbytes in runs:
            run = jax.jit(fn)
            try:
                got = run(sets, x)[0]
            except Exception as exc:  # a knob set the lowering rejects
                print(f"{name} M={m} {impl} {knobs}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            err = float("nan")  # against the reference of the same matrix (not for the anchor and glu)
            if impl.startswith("pallas") and "glu" not in impl:
                want = gemv_reference(x, *sets[0])
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            busy = common.device_busy_seconds(lambda run=run, sets=sets, x=x: run(sets, x), reps=3)
            us = None if busy is None else busy / copies * 1e6
            rows.append([name, f"{n},{k}", m, impl, "-" if knobs is None else ",".join(map(str, knobs)),
                         "-" if us is None else f"{us:.2f}", "-" if us is None else f"{nbytes / us / 1e3:.0f}",
                         "-" if us is None else f"{100 * nbytes / us / 1e3 / (copy_bw / 1e9):.0f}", f"{err:.3g}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print("\ngemv: busy us = GPU busy time per call in a profiler trace; GB/s = weight bytes read (bf16 for the "
          "anchor; words, scales and zeros otherwise) / busy time; % copy = of the jax copy bandwidth above; "
          "max|err| = against XLA's dot of the same quantized matrix")
    print(common.format_table(headers, rows))


if __name__ == "__main__":  # pragma: no cover
    _bench()
