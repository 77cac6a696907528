"""Block-sparse flash-attention forward (prefill), Pallas with the Triton lowering.

  flash_prefill(q, k, v, tables=None, *, lengths, q_offset, window, ...) -> o

q [B, T, H, D]; k, v [B, S, K, D] (GQA: H a multiple of K; head h reads KV head h // G);
bf16 or fp16; D a power of two in 16..256 (64/128/256 are the shipped configurations).
Query i is at absolute position q_offset + i; key s at position s; keys at s >= lengths[b]
are invisible (padding). T and S need not be multiples of the blocks.

Two variants of one kernel body:

  contiguous (tables=None)  causal, optionally a sliding window (Mistral: p - window < s
                            <= p). Loop bounds come from the program id, the query offset
                            and the length; no tables.
  table-driven              a `patterns.BlockTables`: per query block (optionally per
                            head) the full key blocks (no element mask) and the partial
                            ones. The pattern's own q_offset is baked into its tables.

Per program (one query block of one head of one sequence) the key blocks run in separate
loops, so the long loop over full blocks carries no mask arithmetic, no `where` and no
masked loads at all; only the few blocks cut by the pattern (the causal diagonal, a
window's far edge, a pattern's partial blocks) or by the sequence's length pay for a mask.
Those masks are per-row intervals: each row's last visible key min(p, length - 1) and,
with a window, its first one p - window + 1 are computed once per block on [block_q]
vectors, so an element costs one or two compares. Table patterns whose terms are
formulas of the positions (windows, periodic columns, sinks, dilation) evaluate them the
same way (`Pattern.kernel_mask`); only patterns that need a lookup (random blocks, global
token sets, per-head or multi-scale patterns) load an int8 mask tile. Loads are masked
against S only when S is not a multiple of block_k (a static fact).

Table loops read each block index one iteration ahead (carried through the loop), so the
K/V loads of a block never wait on the index load of the same iteration and the Triton
software pipeliner sees plain loop-carried addresses, as in the contiguous loops.

The online softmax runs in base 2 with log2(e) folded into the softmax scale (one FMA
per score), exp2 is the flush-to-zero MUFU instruction (`ex2.approx.ftz.f32`, inline PTX:
no denormal fix-up around it), the PV dot takes probabilities in the input dtype and
accumulates in place (Triton folds `acc * alpha + p @ v` into the MMA's accumulator),
query blocks run heaviest-first, and the grid puts a sequence's heads innermost so the G
query heads of one KV head run side by side and share K/V tiles through L2.

Tiles: Triton keeps each wgmma's result waiting for it (a `wait 0` right after the QK
dot), so a CTA alternates between MMA and softmax; the overlap comes from a second CTA on
the SM. That is why (128, 64) tiles with 4 warps and 2 stages (96 KB of shared memory,
two CTAs per SM) beat 8 warps on an H200 for head_dim 128 even though 4 warps spill.
`DEFAULT_CONFIG` holds the measured choice per head_dim and variant; `TUNE_CONFIGS` the
short lists worth re-measuring (`python3 -m pallas_kernels.flash_prefill --tune`).

GQA: heads are not packed into one tile (G query heads x block_q rows against one K/V
tile). At a fixed tile height that reads exactly as many K/V tiles per FLOP as one head
per program, so it only pays when T is too short to fill a tile (decode, small chunks);
prefill is compute-bound and the L2-friendly grid order already dedups the K/V reads.

Rows with no visible key (padding queries) give unspecified finite values (0 when no key
block is visited). `flash_prefill_reference` is the plain-JAX twin: a dense softmax over
an explicit mask.

Dimensions: B batch, T queries, S keys, H query heads, K KV heads, G = H // K, D head_dim,
nq = ceil(T / block_q).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ollm_jax import patterns as patterns_lib

# Finite, so an all-masked row never computes (-inf) - (-inf).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128, 256)
VARIANTS = ("causal", "window", "table")

# Default tiles per head_dim and variant: (block_q, block_k, num_warps, num_stages).
# Measured on an H200 (B=1, 32 q heads, 8 KV heads, S=16k; bench/results/raw/
# 2026-11-27-h200-fp_tune.log): D=128 causal (128, 64, 4, 2) 4.47 ms vs (128, 128, 8, 3)
# 4.71, (128, 32, 8, 3) 5.19 and (128, 64, 8, 2) 6.32; the same order for windows and
# strided tables; D=64
# (128, 64, 4, 3) 3.32 ms; D=256 (64, 64, 8, 2) 20.4 ms (not yet tuned). The table
# variant keeps the causal block sizes: the router builds a pattern's tables with them.
DEFAULT_CONFIG: dict[int, dict[str, tuple[int, int, int, int]]] = {
    64: {"causal": (128, 64, 4, 3), "window": (128, 64, 4, 3), "table": (128, 64, 4, 3)},
    128: {"causal": (128, 64, 4, 2), "window": (128, 64, 4, 2), "table": (128, 64, 4, 2)},
    256: {"causal": (64, 64, 8, 2), "window": (64, 64, 8, 2), "table": (64, 64, 8, 2)},
}

# Short lists for --tune and bench sweeps, per head_dim and variant, most promising first.
# D=128: the two measured leaders, then 8-warp tiles small enough for two CTAs per SM
# (block_k 32: about 125 registers a thread), then the previous default. Windows and tables
# run mostly full blocks, so the same shapes; tables also try taller key blocks (half the
# loop iterations and index loads). D=256: taller query tiles halve the K/V traffic per FLOP.
TUNE_CONFIGS: dict[int, dict[str, list[tuple[int, int, int, int]]]] = {
    64: {
        "causal": [(128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 3), (128, 128, 4, 2), (128, 32, 4, 3)],
        "window": [(128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 3)],
        "table": [(128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 3)],
    },
    128: {
        "causal": [(128, 64, 4, 2), (128, 128, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2),
                   (128, 32, 4, 2)],
        "window": [(128, 64, 4, 2), (128, 128, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
        "table": [(128, 64, 4, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (128, 64, 4, 3)],
    },
    256: {
        "causal": [(64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
        "window": [(64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
        "table": [(64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
    },
}


def default_config(head_dim: int, variant: str = "table") -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages) for a head_dim and a variant ("causal",
    "window" or "table"; the default "table" is what pattern tables are built with)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: want one of {VARIANTS}")
    return DEFAULT_CONFIG.get(head_dim, DEFAULT_CONFIG[128])[variant]


def _warps_stages(head_dim: int, variant: str, block_q: int, block_k: int) -> tuple[int, int]:
    """num_warps, num_stages for given tiles: the variant's default when the tiles match,
    else the first tuned entry with these tiles, else a rule of thumb."""
    d = head_dim if head_dim in DEFAULT_CONFIG else 128
    cfg = default_config(d, variant)
    if cfg[:2] == (block_q, block_k):
        return cfg[2], cfg[3]
    for bq, bk, w, st in TUNE_CONFIGS[d][variant] + [c for lst in TUNE_CONFIGS[d].values() for c in lst]:
        if (bq, bk) == (block_q, block_k):
            return w, st
    return (8 if block_q * block_k * max(head_dim, 64) >= 128 * 128 * 128 else 4), 2


# ----------------------------------------------------------------------------- kernel


def _exp2(x, fast: bool):
    """2**x in float32. fast: the MUFU instruction with flush-to-zero (libdevice's exp2f
    adds a denormal fix-up around it unless the module is compiled with ftz)."""
    if not fast:
        return jnp.exp2(x)
    [y] = plt.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def _block_start(kb, block_k):
    start = kb * block_k
    return start if isinstance(start, int) else pl.multiple_of(start, block_k)


# Lazy rescaling: keep a row's running max until some row of the tile grows by more than
# this (log2 units), so the [bq, D] accumulator rescale runs only on those rare blocks;
# probabilities stay below 2**LAZY_RESCALE_LOG2 (exact in f32 sums, same relative
# precision in bf16).
LAZY_RESCALE_LOG2 = 8.0


def _visit(carry, kb, *, q, k_ref, v_ref, bias_ref, mask, bounded, seq_k, block_k, qk_scale, fast_exp,
           lazy_rescale=False):
    """One key block: online-softmax update of (acc [bq, D], m [bq], l [bq]).

    mask: None (every pair visible) or bool [bq, bk] / [1, bk]; bounded: mask the loads
    against seq_k (only when S % block_k != 0, on blocks that can reach the end).
    lazy_rescale: rescale acc and l only when a row's max grows by > LAZY_RESCALE_LOG2
    (one tile-wide branch instead of bq * D multiplies per block).
    """
    acc, m_prev, l_prev = carry
    start = _block_start(kb, block_k)
    span = pl.ds(start, block_k)
    if bounded:
        in_range = (start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)) < seq_k  # [bk]
        k = plt.load(k_ref.at[span, :], mask=in_range[:, None], other=0.0)  # [bk, D]
        v = plt.load(v_ref.at[span, :], mask=in_range[:, None], other=0.0)
        bias = None if bias_ref is None else plt.load(bias_ref.at[span], mask=in_range, other=0.0)
    else:
        k, v = k_ref[span, :], v_ref[span, :]
        bias = None if bias_ref is None else bias_ref[span]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [bq, bk]
    if bias is None:
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)  # raw scores: MASK_VALUE * scale stays finite
        # log2(e) * scale folded into one FMA per element (scale > 0: max commutes with it).
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1) * qk_scale)
        if lazy_rescale:
            def rescale(args):
                acc_, l_, m_old, m_cand = args
                alpha_ = _exp2(m_old - m_cand, fast_exp)
                return acc_ * alpha_[:, None], l_ * alpha_, m_cand

            grow = jnp.max(m_new - m_prev)  # +inf on the first block (m_prev = -inf)
            acc, l_prev, m_new = lax.cond(grow > LAZY_RESCALE_LOG2, rescale, lambda a: a[:3],
                                          (acc, l_prev, m_prev, m_new))
            p = _exp2(s * qk_scale - m_new[:, None], fast_exp)
            l_new = l_prev + jnp.sum(p, axis=1)
            acc = acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return acc, m_new, l_new
        p = _exp2(s * qk_scale - m_new[:, None], fast_exp)
    else:
        s = s * qk_scale + bias[None, :]  # bias [bk] in log2 units
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = _exp2(s - m_new[:, None], fast_exp)  # [bq, bk]
    alpha = _exp2(m_prev - m_new, fast_exp)  # [bq]
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l_new


def _start(q_ref, qi, *, seq_q, block_q, head_dim):
    """Loads the query tile (rows past T masked only when T % block_q); returns (q, row_ok,
    carry); row_ok is None when every row is valid."""
    if seq_q % block_q:
        row_ok = (qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)) < seq_q  # [bq]
        q = plt.load(q_ref, mask=row_ok[:, None], other=0.0)  # [bq, D]
    else:
        row_ok, q = None, q_ref[...]
    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    return q, row_ok, carry


def _finish(o_ref, carry, row_ok):
    acc, _, l = carry
    inv = 1.0 / jnp.where(l == 0.0, 1.0, l)  # a row that visited no block: 0, not NaN
    out = (acc * inv[:, None]).astype(o_ref.dtype)
    if row_ok is None:
        o_ref[...] = out
    else:
        plt.store(o_ref, out, mask=row_ok[:, None])


def _contiguous_kernel(q_ref, k_ref, v_ref, len_ref, off_ref, *refs, window, seq_q, seq_k, block_q,
                       block_k, num_q_blocks, qk_scale, has_bias, fast_exp, lazy_rescale):
    # q_ref [bq, D]; k_ref, v_ref [S, D]; len_ref, off_ref [B] int32; (bias_ref [S] f32);
    # o_ref [bq, D].
    bias_ref, o_ref = refs if has_bias else (None, *refs)
    qi = num_q_blocks - 1 - pl.program_id(1)  # heaviest query blocks first
    b = pl.program_id(2)
    length = len_ref[b]
    p0 = off_ref[b] + qi * block_q  # position of the block's first query
    rows_in_block = block_q if seq_q % block_q == 0 else jnp.minimum(block_q, seq_q - qi * block_q)
    p_last = p0 + rows_in_block - 1
    q, row_ok, carry = _start(q_ref, qi, seq_q=seq_q, block_q=block_q, head_dim=q_ref.shape[-1])
    visit = functools.partial(_visit, q=q, k_ref=k_ref, v_ref=v_ref, bias_ref=bias_ref, seq_k=seq_k,
                              block_k=block_k, qk_scale=qk_scale, fast_exp=fast_exp,
                              lazy_rescale=lazy_rescale)

    # Key blocks [k_lo, k_hi) hold every visible key of any row; [f_lo, f_hi) need no mask.
    k_hi = lax.div(jnp.maximum(jnp.minimum(p_last, length - 1) + block_k, 0), block_k)
    f_hi = jnp.minimum(lax.div(p0 + 1, block_k), lax.div(length, block_k))
    if window is None:
        k_lo = f_lo = jnp.int32(0)
    else:
        k_lo = lax.div(jnp.maximum(p0 - window + 1, 0), block_k)
        f_lo = lax.div(jnp.maximum(p_last - window + 1, 0) + block_k - 1, block_k)
    f_lo = jnp.clip(f_lo, k_lo, k_hi)
    f_hi = jnp.clip(f_hi, f_lo, k_hi)

    # Per-row visible interval [lo_row, hi_row] (absolute key positions), once per program.
    rows = p0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)  # [bq]
    hi_row = jnp.minimum(rows, length - 1)  # causal and the sequence's length
    lo_row = None if window is None else rows - (window - 1)
    col = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)  # [1, bk]
    bounded = seq_k % block_k != 0

    def masked(kb, c):
        base = kb * block_k
        mask = col <= (hi_row - base)[:, None]  # [bq, bk]: one compare per element
        if lo_row is not None:
            mask &= col >= (lo_row - base)[:, None]
        return visit(c, kb, mask=mask, bounded=bounded)

    carry = lax.fori_loop(f_lo, f_hi, lambda kb, c: visit(c, kb, mask=None, bounded=False), carry)
    if window is None:
        carry = lax.fori_loop(f_hi, k_hi, masked, carry)  # the diagonal and the length's edge
    else:
        # One loop (one pipeline fill) over the window's far edge [k_lo, f_lo), then the
        # diagonal and the length's edge [f_hi, k_hi).
        n_far = f_lo - k_lo
        carry = lax.fori_loop(0, n_far + k_hi - f_hi,
                              lambda j, c: masked(jnp.where(j < n_far, k_lo + j, f_hi + (j - n_far)), c), carry)
    _finish(o_ref, carry, row_ok)


def _prefetched_loop(lo, hi, index_at, width, body, carry):
    """`for j in [lo, hi): carry = body(idx_j, carry)` with idx_j = index_at(j) (a tuple of
    scalars read from tables of `width` entries) loaded one iteration ahead and carried, so
    the block's K/V addresses do not wait on a load of the same iteration."""
    first = index_at(jnp.minimum(lo, width - 1))

    def step(j, c):
        inner, idx = c
        nxt = index_at(jnp.minimum(j + 1, width - 1))  # past the count: padding, never used
        return body(idx, inner), nxt

    carry, _ = lax.fori_loop(lo, hi, step, (carry, first))
    return carry


def _table_kernel(q_ref, k_ref, v_ref, cnt_ref, full_ref, part_ref, *refs, formula, seq_q, seq_k, block_q,
                  block_k, num_q_blocks, q_offset, qk_scale, has_bias, per_head, per_seq_counts, has_cut, fast_exp,
                  lazy_rescale):
    # q_ref [bq, D]; k_ref, v_ref [S, D]; cnt_ref [B or 1, Ht, nq, 4] int32 (clean full
    # blocks, full blocks below the length, partial blocks below the length); full_ref
    # [Ht, nq, F], part_ref [Ht, nq, P] int32; without a formula tile_id_ref [Ht, nq, P]
    # int32 and tiles_ref [n_tiles * bq, bk] int8; len_ref [B]; (bias_ref [S] f32);
    # o_ref [bq, D].
    if formula is None:
        tile_id_ref, tiles_ref, len_ref, *refs = refs
    else:
        tile_id_ref = tiles_ref = None
        len_ref, *refs = refs
    bias_ref, o_ref = refs if has_bias else (None, *refs)
    h = pl.program_id(0)
    qi = num_q_blocks - 1 - pl.program_id(1)
    b = pl.program_id(2)
    ht = h if per_head else 0
    bc = b if per_seq_counts else 0
    length = len_ref[b]
    n_clean = cnt_ref[bc, ht, qi, 0]
    n_full = cnt_ref[bc, ht, qi, 1]
    n_part = cnt_ref[bc, ht, qi, 2]
    q, row_ok, carry = _start(q_ref, qi, seq_q=seq_q, block_q=block_q, head_dim=q_ref.shape[-1])
    visit = functools.partial(_visit, q=q, k_ref=k_ref, v_ref=v_ref, bias_ref=bias_ref, seq_k=seq_k,
                              block_k=block_k, qk_scale=qk_scale, fast_exp=fast_exp,
                              lazy_rescale=lazy_rescale)
    col = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)  # [1, bk]
    bounded = seq_k % block_k != 0
    full_width, part_width = full_ref.shape[-1], part_ref.shape[-1]

    def full_at(j):
        return (full_ref[ht, qi, j],)

    def clean(idx, c):
        return visit(c, idx[0], mask=None, bounded=False)

    def cut_by_length(idx, c):  # a full block that holds the sequence's last key
        base = idx[0] * block_k
        return visit(c, idx[0], mask=col < length - base, bounded=bounded)

    if formula is not None:
        rows = q_offset + qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)  # [bq, 1]
        # Causality and the length in one per-row bound: key s visible iff s <= hi_row.
        hi_row = jnp.minimum(rows, length - 1) if formula.causal else jnp.broadcast_to(length - 1, rows.shape)

        def part_at(j):
            return (part_ref[ht, qi, j],)

        def partial(idx, c):
            base = idx[0] * block_k
            keys = base + col  # [1, bk] absolute positions
            mask = col <= hi_row - base
            terms = formula.kernel_mask(rows, keys, causal=False)
            if terms is not None:
                mask &= terms
            return visit(c, idx[0], mask=mask, bounded=bounded)
    else:
        def part_at(j):
            return part_ref[ht, qi, j], tile_id_ref[ht, qi, j]

        def partial(idx, c):
            kb, tile_id = idx
            tile = tiles_ref[pl.ds(pl.multiple_of(tile_id * block_q, block_q), block_q), :]  # [bq, bk]
            mask = (tile != 0) & (col < length - kb * block_k)
            return visit(c, kb, mask=mask, bounded=bounded)

    carry = _prefetched_loop(0, n_clean, full_at, full_width, clean, carry)
    if has_cut:  # statically absent when every key is valid and S % block_k == 0
        carry = _prefetched_loop(n_clean, n_full, full_at, full_width, cut_by_length, carry)
    carry = _prefetched_loop(0, n_part, part_at, part_width, partial, carry)
    _finish(o_ref, carry, row_ok)


# ----------------------------------------------------------------------------- wrapper


def _check(q, k, v, block_q, block_k):
    b, t, h, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: want q [B, T, H, D], k = v [B, S, K, D]")
    if h % k.shape[2]:
        raise ValueError(f"query heads {h} not a multiple of KV heads {k.shape[2]}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: want one of bfloat16/float16")
    for name, n in (("head_dim", d), ("block_q", block_q), ("block_k", block_k)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name}={n} must be a power of two >= 16 (Triton tiles)")


def _lengths(lengths, batch, seq_k):
    if lengths is None:
        return jnp.full((batch,), seq_k, jnp.int32)
    return jnp.minimum(jnp.asarray(lengths, jnp.int32).reshape(batch), seq_k)


def flash_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tables: patterns_lib.BlockTables | None = None,
    *,
    lengths: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    window: int | None = None,
    key_bias: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fast_exp: bool | None = None,
    lazy_rescale: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Causal (optionally windowed or block-sparse) attention forward.

    Args:
      q: [B, T, H, D] queries (bf16/fp16).
      k, v: [B, S, K, D] keys and values, slot s at position s.
      tables: None for the contiguous variant (causal + `window`), else the pattern's
        `block_tables(T, S, block_q, block_k, q_offset)`; its blocks and offset are used.
      lengths: [B] valid keys per sequence (keys >= lengths[b] are padding); None = S.
      q_offset: absolute position of query 0 (int or [B] int32); contiguous variant only.
      window: sliding window (contiguous variant); None = dense causal.
      key_bias: optional [S] float32 added to the scores (natural-log units; MultiScale).
      sm_scale: softmax scale; None = D ** -0.5.
      block_q, block_k, num_warps, num_stages: tuning knobs (None = `default_config` of
        the variant; warps and stages for other tiles from `TUNE_CONFIGS`).
      fast_exp: exp2 as the flush-to-zero MUFU instruction (inline PTX); None = on, except
        in interpret mode (the CPU has no PTX).
      lazy_rescale: skip the accumulator rescale unless a row's max grows by more than
        2**LAZY_RESCALE_LOG2 (experimental; not with key_bias).
      interpret: run in Pallas interpret mode (CPU).
    Returns:
      [B, T, H, D] in q's dtype.
    """
    d = q.shape[-1]
    variant = "table" if tables is not None else ("causal" if window is None else "window")
    dq, dk, _, _ = default_config(d, variant)
    if tables is not None:
        if (block_q or tables.block_q) != tables.block_q or (block_k or tables.block_k) != tables.block_k:
            raise ValueError(f"{block_q=}, {block_k=} differ from the tables' ({tables.block_q}, {tables.block_k})")
        if (tables.seq_q, tables.seq_k) != (q.shape[1], k.shape[1]):
            raise ValueError(f"tables for T={tables.seq_q}, S={tables.seq_k}; got T={q.shape[1]}, S={k.shape[1]}")
        if tables.num_heads not in (1, q.shape[2]):
            raise ValueError(f"tables have {tables.num_heads} heads; want 1 or H={q.shape[2]}")
        block_q, block_k = tables.block_q, tables.block_k
        if window is not None:
            raise ValueError("window applies to the contiguous variant; table patterns carry their own")
    block_q, block_k = block_q or dq, block_k or dk
    _check(q, k, v, block_q, block_k)
    dw, ds = _warps_stages(d, variant, block_q, block_k)
    scale = float(sm_scale if sm_scale is not None else d**-0.5)
    counts = None if tables is None else _table_counts(tables, lengths, q.shape[0])
    counts_from_lengths = lengths is not None
    lengths = _lengths(lengths, q.shape[0], k.shape[1])
    bias = None if key_bias is None else jnp.asarray(key_bias, jnp.float32) * LOG2E
    knobs = dict(sm_scale=scale, block_q=block_q, block_k=block_k, num_warps=num_warps or dw,
                 num_stages=num_stages or ds, fast_exp=(not interpret) if fast_exp is None else bool(fast_exp),
                 lazy_rescale=bool(lazy_rescale), interpret=interpret)
    if knobs["fast_exp"] and interpret:
        raise ValueError("fast_exp is inline PTX: not available in interpret mode")
    if tables is None:
        offsets = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (q.shape[0],))
        return _contiguous_call(q, k, v, lengths, offsets, bias, window=window, **knobs)
    has_cut = counts_from_lengths or k.shape[1] % block_k != 0  # else n_full == n_clean
    tile_args = () if tables.formula is not None else (
        jnp.asarray(tables.part_tile), jnp.asarray(tables.tiles.reshape(-1, block_k)))
    return _table_call(
        q, k, v, counts, jnp.asarray(tables.full_idx), jnp.asarray(tables.part_idx), tile_args, lengths, bias,
        formula=tables.formula, q_offset=tables.q_offset, has_cut=has_cut, **knobs,
    )


def _table_counts(tables: patterns_lib.BlockTables, lengths, batch: int | None = None):
    """[B or 1, Ht, nq, 4] int32: full blocks wholly below the length, full blocks below
    ceil(length), partial blocks below ceil(length) (lists are ascending, so prefixes).
    Without lengths (every key valid) the counts are host constants (numpy, [1, ...])."""
    bk = tables.block_k
    if lengths is None:
        xp, n = np, np.full((1,), tables.seq_k, np.int64)
    else:
        xp, n = jnp, _lengths(lengths, jnp.size(lengths) if batch is None else batch, tables.seq_k)
    clean_end = (n // bk)[:, None, None, None]  # [B, 1, 1, 1]
    any_end = ((n + bk - 1) // bk)[:, None, None, None]
    full_idx, part_idx = xp.asarray(tables.full_idx)[None], xp.asarray(tables.part_idx)[None]  # [1, Ht, nq, F]
    full_ok = xp.arange(full_idx.shape[-1]) < xp.asarray(tables.full_cnt)[None, :, :, None]
    part_ok = xp.arange(part_idx.shape[-1]) < xp.asarray(tables.part_cnt)[None, :, :, None]
    n_clean = xp.sum(full_ok & (full_idx < clean_end), axis=-1)  # [B, Ht, nq]
    n_full = xp.sum(full_ok & (full_idx < any_end), axis=-1)
    n_part = xp.sum(part_ok & (part_idx < any_end), axis=-1)
    return xp.stack([n_clean, n_full, n_part, xp.zeros_like(n_part)], axis=-1).astype(xp.int32)


def _specs(q, k, block_q, num_q_blocks):
    """BlockSpecs over the grid (H, nq, B): heads innermost, query blocks reversed."""
    seq_k, d = k.shape[1], q.shape[-1]
    group = q.shape[2] // k.shape[2]
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda h, i, b: (b, num_q_blocks - 1 - i, h, 0))
    kv_spec = pl.BlockSpec((None, seq_k, None, d), lambda h, i, b: (b, 0, h // group, 0))
    return q_spec, kv_spec


@functools.partial(jax.jit, static_argnames=("window", "sm_scale", "block_q", "block_k", "num_warps",
                                             "num_stages", "fast_exp", "lazy_rescale", "interpret"))
def _contiguous_call(q, k, v, lengths, offsets, bias, *, window, sm_scale, block_q, block_k, num_warps,
                     num_stages, fast_exp, lazy_rescale, interpret):
    b, t, h, d = q.shape
    nq = pl.cdiv(t, block_q)
    q_spec, kv_spec = _specs(q, k, block_q, nq)
    kernel = functools.partial(
        _contiguous_kernel, window=window, seq_q=t, seq_k=k.shape[1], block_q=block_q, block_k=block_k,
        num_q_blocks=nq, qk_scale=sm_scale * LOG2E, has_bias=bias is not None, fast_exp=fast_exp,
        lazy_rescale=lazy_rescale,
    )
    extra = () if bias is None else (bias,)
    return pl.pallas_call(
        kernel,
        grid=(h, nq, b),
        in_specs=[q_spec, kv_spec, kv_spec, pl.no_block_spec, pl.no_block_spec] + [pl.no_block_spec] * len(extra),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"flash_prefill_{'causal' if window is None else 'window'}",
    )(q, k, v, lengths, offsets, *extra)


@functools.partial(jax.jit, static_argnames=("formula", "q_offset", "has_cut", "sm_scale", "block_q", "block_k",
                                             "num_warps", "num_stages", "fast_exp", "lazy_rescale", "interpret"))
def _table_call(q, k, v, counts, full_idx, part_idx, tile_args, lengths, bias, *, formula, q_offset, has_cut, sm_scale,
                block_q, block_k, num_warps, num_stages, fast_exp, lazy_rescale, interpret):
    b, t, h, d = q.shape
    nq = pl.cdiv(t, block_q)
    q_spec, kv_spec = _specs(q, k, block_q, nq)
    kernel = functools.partial(
        _table_kernel, formula=formula, seq_q=t, seq_k=k.shape[1], block_q=block_q, block_k=block_k,
        num_q_blocks=nq, q_offset=q_offset, qk_scale=sm_scale * LOG2E, has_bias=bias is not None,
        per_head=full_idx.shape[0] > 1, per_seq_counts=counts.shape[0] > 1, has_cut=has_cut, fast_exp=fast_exp,
        lazy_rescale=lazy_rescale,
    )
    extra = () if bias is None else (bias,)
    inputs = (q, k, v, counts, full_idx, part_idx, *tile_args, lengths, *extra)
    return pl.pallas_call(
        kernel,
        grid=(h, nq, b),
        in_specs=[q_spec, kv_spec, kv_spec] + [pl.no_block_spec] * (len(inputs) - 3),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_prefill_sparse",
    )(*inputs)


# ----------------------------------------------------------------------------- reference

@functools.partial(jax.jit, static_argnames=("sm_scale",))
def flash_prefill_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    lengths: jax.Array | None = None,
    key_bias: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-JAX twin: dense softmax over an explicit mask, in float32.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D].
      mask: bool visible pairs: [T, S], [H, T, S] (per-head patterns) or
        [B or 1, H or 1, T, S] (per-sequence query offsets).
      lengths: [B] valid keys per sequence; None = S.
      key_bias: optional [S] float32 added to the scores (natural log).
    Returns:
      [B, T, H, D] in q's dtype. Rows with no visible key give the mean of V (finite).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [B, T, K, G, D]
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S]
    if key_bias is not None:
        s = s + jnp.asarray(key_bias, jnp.float32)
    mask = jnp.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[None]  # [1, H, T, S]
    if mask.shape[1] == h:  # -> [B or 1, K, G, T, S]
        mask = mask.reshape(mask.shape[0], kv_heads, h // kv_heads, t, -1)
    else:
        mask = mask[:, :, None]
    mask = mask & (jnp.arange(k.shape[1]) < _lengths(lengths, b, k.shape[1])[:, None, None, None, None])
    s = jnp.where(mask, s, MASK_VALUE)
    probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def causal_mask(seq_q: int, seq_k: int, q_offset=0, window: int | None = None) -> jax.Array:
    """bool [T, S] of the contiguous variant (q_offset a scalar, static or traced)."""
    p = q_offset + jnp.arange(seq_q)[:, None]
    s = jnp.arange(seq_k)[None, :]
    m = s <= p
    return m if window is None else m & (s > p - window)


# ----------------------------------------------------------------------------- FLOPs


def kept_flops(tables: patterns_lib.BlockTables, batch: int, num_heads: int, head_dim: int) -> float:
    """FLOPs of the kept blocks (2 dots of 2 * bq * bk * D each), over batch and heads."""
    per_head = tables.kept_blocks / tables.num_heads
    return 4.0 * tables.block_q * tables.block_k * head_dim * per_head * num_heads * batch


# ----------------------------------------------------------------------------- __main__


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 n^3 matmul TFLOP/s on the default device (the compute ceiling)."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / time_fn(f, a, reps=reps) / 1e12


def time_fn(fn, *args, reps: int = 5, calls: int | None = None, work_s: float = 0.05) -> float:
    """Seconds per call: after two compile/warm-up calls, `calls` calls are dispatched back
    to back and blocked on once (launch overhead amortised, as inside a model's jit);
    median over `reps` such runs. calls=None: about `work_s` of work per run (at most
    2000 calls a second of it)."""
    import statistics
    import time

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))  # a first trace may register config state that retraces once
    if calls is None:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls = max(1, min(int(2000 * work_s), int(work_s / max(time.perf_counter() - t0, 1e-6))))
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        runs.append((time.perf_counter() - t0) / calls)
        del outs
    return statistics.median(runs)


SWEEP_PATTERNS = {
    "causal": patterns_lib.DenseCausal(),
    "window1024": patterns_lib.SlidingWindow(1024),
    "window4096": patterns_lib.SlidingWindow(4096),
    "strided": patterns_lib.anchors_strided(),
}
ANCHOR_MS = {"strided": 1.19}  # ANCHORS.md, H200, S=16k: FlexAttention on the strided pattern


def _pattern_variant(pat: patterns_lib.Pattern) -> str:
    if not pat.contiguous:
        return "table"
    return "causal" if pat.contiguous_window is None else "window"


def _sweep_rows(variant: str, d: int, tune: bool) -> list[tuple[tuple[int, int, int, int], dict, str]]:
    """(config, extra flash_prefill knobs, label) to time: the default first (its output is
    the reference for the others), then the tune list, then ablations of the default."""
    default = default_config(d, variant)
    configs = [default] + ([c for c in TUNE_CONFIGS[d][variant] if c != default] if tune else [])
    rows = [(c, {}, "") for c in configs]
    if tune:  # ablations of the default: what each of this kernel's choices is worth
        rows.append((default, {"lazy_rescale": True}, "lazy rescale"))
        if variant == "causal":
            rows.append((default, {"fast_exp": False}, "exp2=libdevice"))
        if variant == "table":
            rows.append((default, {"tiles": True}, "mask tiles"))
    return rows


def _main() -> None:
    import argparse
    import dataclasses
    import time

    ap = argparse.ArgumentParser(description="Sweep flash_prefill on the GPU: ms, TFLOP/s, cuDNN side by side.")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--patterns", nargs="+", default=list(SWEEP_PATTERNS), choices=list(SWEEP_PATTERNS))
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tune", action="store_true",
                    help="also TUNE_CONFIGS and ablations (lazy rescale, libdevice exp2, mask tiles)")
    ap.add_argument("--configs", nargs="+", default=None, metavar="BQ,BK,W,S", help="explicit configurations")
    ap.add_argument("--cudnn", action="store_true", help="cuDNN (jax.nn.dot_product_attention) side by side")
    ap.add_argument("--check", action="store_true", help="GPU numerics against the reference first")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new configuration after this many s")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("this sweep needs a GPU (tests run the kernel in interpret mode on the CPU)")
    t_start = time.perf_counter()
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    peak = matmul_peak_tflops()
    print(f"bf16 matmul peak (measured, 8192^3): {peak:.0f} TFLOP/s", flush=True)
    if args.check:
        _check_numerics()
    key = jax.random.key(0)
    summary = []
    for d in args.head_dim:
        for seq in args.seq:
            kq, kk, kv = jax.random.split(jax.random.fold_in(key, seq * d), 3)
            q = jax.random.normal(kq, (1, seq, args.heads, d), jnp.bfloat16)
            k = jax.random.normal(kk, (1, seq, args.kv_heads, d), jnp.bfloat16)
            v = jax.random.normal(kv, (1, seq, args.kv_heads, d), jnp.bfloat16)
            causal_ms = None
            for name in args.patterns:
                pat = SWEEP_PATTERNS[name]
                variant = _pattern_variant(pat)
                dbq, dbk = default_config(d, variant)[:2]
                # One FLOP count per pattern (kept blocks at the variant's default tiles), so
                # TFLOP/s ratios between configurations and cuDNN are time ratios.
                flops = kept_flops(pat.block_tables(seq, seq, dbq, dbk), 1, args.heads, d)
                rows = ([(tuple(int(x) for x in c.split(",")), {}, "") for c in args.configs] if args.configs
                        else _sweep_rows(variant, d, args.tune))
                results, ref_out = [], None
                for (bq, bk, w, st), extra, label in rows:
                    if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                        print(f"  (budget of {args.budget_s:.0f} s spent: skipping the rest)", flush=True)
                        break
                    extra = dict(extra)
                    tables = None
                    if not pat.contiguous:
                        tables = pat.block_tables(seq, seq, bq, bk)
                        if extra.pop("tiles", False):
                            tables = dataclasses.replace(tables, formula=None)
                    fn = jax.jit(functools.partial(
                        flash_prefill, tables=tables, window=pat.contiguous_window, block_q=bq, block_k=bk,
                        num_warps=w, num_stages=st, **extra))
                    tag = f"bq={bq:3d} bk={bk:3d} w={w} s={st}" + (f" {label}" if label else "")
                    try:
                        sec = time_fn(fn, q, k, v, reps=args.reps)
                        out = fn(q, k, v)
                    except Exception as e:  # a configuration Triton rejects (shared memory, registers)
                        print(f"  D={d} S={seq} {name} {tag}: failed ({type(e).__name__}: {str(e)[:120]})", flush=True)
                        continue
                    if ref_out is None:
                        ref_out, diff = out, 0.0
                    else:
                        diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
                    tf = flops / sec / 1e12
                    results.append((sec, tag))
                    print(f"  D={d:3d} S={seq:6d} {name:10s} {tag:36s} {sec * 1e3:8.3f} ms {tf:6.1f} TFLOP/s "
                          f"({100 * tf / peak:4.1f}% of matmul) |diff vs first| {diff:.1e}", flush=True)
                    del out
                if not results:
                    continue
                best_sec, best_tag = min(results)
                line = (f"BEST D={d} S={seq} {name}: {best_tag} {best_sec * 1e3:.3f} ms "
                        f"{flops / best_sec / 1e12:.1f} TFLOP/s")
                if name == "causal":
                    causal_ms = best_sec * 1e3
                if args.cudnn and pat.contiguous:
                    w_ = pat.contiguous_window
                    cud = jax.jit(lambda q, k, v, w_=w_: jax.nn.dot_product_attention(
                        q, k, v, is_causal=True, implementation="cudnn",
                        local_window_size=None if w_ is None else (w_ - 1, 0)))
                    try:
                        c_sec = time_fn(cud, q, k, v, reps=args.reps)
                        c_out = cud(q, k, v)
                        diff = float(jnp.max(jnp.abs(c_out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
                        print(f"  D={d:3d} S={seq:6d} {name:10s} {'cudnn':36s} {c_sec * 1e3:8.3f} ms "
                              f"{flops / c_sec / 1e12:6.1f} TFLOP/s |diff vs ours| {diff:.1e}", flush=True)
                        line += (f" | cuDNN {c_sec * 1e3:.3f} ms: ours/cuDNN time {best_sec / c_sec:.3f}, "
                                 f"TFLOP/s ratio {c_sec / best_sec:.3f}")
                    except Exception as e:
                        print(f"  cudnn {name}: failed ({type(e).__name__}: {str(e)[:160]})", flush=True)
                elif name in ANCHOR_MS and seq == 16384:
                    anchor = ANCHOR_MS[name]
                    line += f" | FlexAttention anchor {anchor} ms: ratio {best_sec * 1e3 / anchor:.3f}"
                    if causal_ms:
                        dens = pat.block_tables(seq, seq, dbq, dbk).kept_blocks / patterns_lib.DenseCausal(
                        ).block_tables(seq, seq, dbq, dbk).kept_blocks
                        line += f"; budget 1.3*d*t_causal = {1.3 * dens * causal_ms:.3f} ms (+launch)"
                summary.append(line)
                print(line, flush=True)
            del q, k, v
    print("\nSUMMARY")
    for line in summary:
        print(line)
    print(f"total {time.perf_counter() - t_start:.0f} s")


def _check_numerics() -> None:
    """GPU numerics against the reference: ragged T/S, lengths, offsets, every head_dim, the
    formula-mask and the tile-mask table paths."""
    key = jax.random.key(1)
    # Ragged (T, S not multiples of the tiles, lengths, an offset: masked loads, the
    # length-cut loop) everywhere; aligned without lengths (unmasked loads, no cut loop) at 128.
    shapes = {d: [(300, 1300, 1000, True)] + ([(256, 1024, 768, False)] if d == 128 else []) for d in HEAD_DIMS}
    for d in HEAD_DIMS:
        for (t, s, off, ragged), pat in itertools.product(shapes[d], (
                patterns_lib.DenseCausal(), patterns_lib.SlidingWindow(100), patterns_lib.anchors_strided(),
                patterns_lib.BigBird(64, 16, 2, 64))):
            kq, kk, kv = jax.random.split(jax.random.fold_in(key, d), 3)
            q = jax.random.normal(kq, (2, t, 8, d), jnp.bfloat16)
            k = jax.random.normal(kk, (2, s, 2, d), jnp.bfloat16)
            v = jax.random.normal(kv, (2, s, 2, d), jnp.bfloat16)
            lengths = jnp.array([s, s - 37], jnp.int32) if ragged else None
            bq, bk, _, _ = default_config(d, _pattern_variant(pat))
            tabs = None if pat.contiguous else pat.block_tables(t, s, bq, bk, off)
            out = flash_prefill(q, k, v, tabs, lengths=lengths, q_offset=off, window=pat.contiguous_window)
            mask = pat.token_mask(t, s, off)
            ref = flash_prefill_reference(q, k, v, mask, lengths=lengths)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            print(f"  check D={d} T={t} S={s} {patterns_lib.describe(pat)}: max |err| {err:.4f}", flush=True)
            assert err < 2e-2, err


if __name__ == "__main__":
    _main()
