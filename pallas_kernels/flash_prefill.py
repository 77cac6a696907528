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
                            ones (element mask tile). The pattern's own q_offset is baked
                            into its tables.

Per program (one query block of one head of one sequence) the key blocks run in three
loops: the blocks needing no element mask (no mask arithmetic at all), then the few cut
by the pattern or by the sequence's length (masked, and their loads masked against S).
The online softmax runs in base 2 with log2(e) folded into the softmax scale, the PV dot
takes probabilities in the input dtype, query blocks run heaviest-first, and the grid
puts a sequence's heads innermost so the G query heads of one KV head run side by side
and share K/V tiles through L2.

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

# Default tiles per head_dim: (block_q, block_k, num_warps, num_stages). Tuned on the GPU
# with `python3 -m pallas_kernels.flash_prefill --tune`; see bench/README.md.
DEFAULT_CONFIG = {
    64: (128, 64, 4, 3),
    128: (128, 64, 8, 3),
    256: (64, 64, 8, 2),
}


def default_config(head_dim: int) -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages) for a head_dim."""
    return DEFAULT_CONFIG.get(head_dim, DEFAULT_CONFIG[128])


# ----------------------------------------------------------------------------- kernel


def _visit(carry, q, k_ref, v_ref, bias_ref, kb, *, mask, bounded, seq_k, block_k, qk_scale):
    """One key block: online-softmax update of (acc [bq, D], m [bq], l [bq]).

    mask: None (every pair visible) or bool [bq, bk] / [1, bk]; bounded: mask the loads
    against seq_k (only blocks that can reach the end of the keys).
    """
    acc, m_prev, l_prev = carry
    start = pl.multiple_of(kb * block_k, block_k)
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
    if mask is None and bias is None:
        # log2(e) * scale folded into one multiply per element (fused with the max subtract).
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1) * qk_scale)
        p = jnp.exp2(s * qk_scale - m_new[:, None])
    else:
        s = s * qk_scale
        if bias is not None:
            s = s + bias[None, :]  # [bk] in log2 units
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])  # [bq, bk]
    alpha = jnp.exp2(m_prev - m_new)  # [bq]
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l_new


def _finish(o_ref, acc, l, row_ok):
    l = jnp.where(l == 0.0, 1.0, l)  # a row that visited no block: 0, not NaN
    plt.store(o_ref, (acc / l[:, None]).astype(o_ref.dtype), mask=row_ok[:, None])


def _start(q_ref, qi, seq_q, block_q, head_dim):
    """Loads the query tile (rows past T masked); returns (q, row_ok, carry)."""
    row_ok = (qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)) < seq_q  # [bq]
    q = plt.load(q_ref, mask=row_ok[:, None], other=0.0)  # [bq, D]
    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    return q, row_ok, carry


def _contiguous_kernel(q_ref, k_ref, v_ref, len_ref, off_ref, *refs, window, seq_q, seq_k, block_q,
                       block_k, num_q_blocks, qk_scale, has_bias):
    # q_ref [bq, D]; k_ref, v_ref [S, D]; len_ref, off_ref [B] int32; (bias_ref [S] f32);
    # o_ref [bq, D].
    bias_ref, o_ref = refs if has_bias else (None, *refs)
    qi = num_q_blocks - 1 - pl.program_id(1)  # heaviest query blocks first
    b = pl.program_id(2)
    length = len_ref[b]
    p0 = off_ref[b] + qi * block_q  # position of the block's first query
    p_last = p0 + jnp.minimum(block_q, seq_q - qi * block_q) - 1
    q, row_ok, carry = _start(q_ref, qi, seq_q, block_q, q_ref.shape[-1])
    visit = functools.partial(_visit, q=q, k_ref=k_ref, v_ref=v_ref, bias_ref=bias_ref, seq_k=seq_k,
                              block_k=block_k, qk_scale=qk_scale)

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

    q_pos = p0 + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)  # [bq, bk]
    col = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)

    def masked(kb, c):
        k_pos = kb * block_k + col
        mask = (k_pos <= q_pos) & (k_pos < length)
        if window is not None:
            mask &= k_pos > q_pos - window
        return visit(c, kb=kb, mask=mask, bounded=True)

    carry = lax.fori_loop(f_lo, f_hi, lambda kb, c: visit(c, kb=kb, mask=None, bounded=False), carry)
    carry = lax.fori_loop(k_lo, f_lo, masked, carry)  # window's far edge
    carry = lax.fori_loop(f_hi, k_hi, masked, carry)  # the diagonal and the length's edge
    acc, _, l = carry
    _finish(o_ref, acc, l, row_ok)


def _table_kernel(q_ref, k_ref, v_ref, cnt_ref, full_ref, part_ref, tile_id_ref, tiles_ref, len_ref, *refs,
                  seq_q, seq_k, block_q, block_k, num_q_blocks, qk_scale, has_bias, per_head):
    # q_ref [bq, D]; k_ref, v_ref [S, D]; cnt_ref [B, Ht, nq, 4] int32 (clean full blocks,
    # full blocks below the length, partial blocks below the length); full_ref, part_ref,
    # tile_id_ref [Ht, nq, F or P] int32; tiles_ref [n_tiles * bq, bk] int8; len_ref [B];
    # (bias_ref [S] f32); o_ref [bq, D].
    bias_ref, o_ref = refs if has_bias else (None, *refs)
    h = pl.program_id(0)
    qi = num_q_blocks - 1 - pl.program_id(1)
    b = pl.program_id(2)
    ht = h if per_head else 0
    length = len_ref[b]
    n_clean = cnt_ref[b, ht, qi, 0]
    n_full = cnt_ref[b, ht, qi, 1]
    n_part = cnt_ref[b, ht, qi, 2]
    q, row_ok, carry = _start(q_ref, qi, seq_q, block_q, q_ref.shape[-1])
    visit = functools.partial(_visit, q=q, k_ref=k_ref, v_ref=v_ref, bias_ref=bias_ref, seq_k=seq_k,
                              block_k=block_k, qk_scale=qk_scale)
    col = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

    def clean(j, c):
        return visit(c, kb=full_ref[ht, qi, j], mask=None, bounded=False)

    def cut_by_length(j, c):  # a full block that holds the sequence's last key
        kb = full_ref[ht, qi, j]
        return visit(c, kb=kb, mask=kb * block_k + col < length, bounded=True)

    def partial(j, c):
        kb = part_ref[ht, qi, j]
        tile = tiles_ref[pl.ds(pl.multiple_of(tile_id_ref[ht, qi, j] * block_q, block_q), block_q), :]  # [bq, bk]
        mask = (tile != 0) & (kb * block_k + col < length)
        return visit(c, kb=kb, mask=mask, bounded=True)

    carry = lax.fori_loop(0, n_clean, clean, carry)
    carry = lax.fori_loop(n_clean, n_full, cut_by_length, carry)
    carry = lax.fori_loop(0, n_part, partial, carry)
    acc, _, l = carry
    _finish(o_ref, acc, l, row_ok)


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
      block_q, block_k, num_warps, num_stages: tuning knobs (None = `default_config`).
      interpret: run in Pallas interpret mode (CPU).
    Returns:
      [B, T, H, D] in q's dtype.
    """
    d = q.shape[-1]
    dq, dk, dw, ds = default_config(d)
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
    scale = float(sm_scale if sm_scale is not None else d**-0.5)
    lengths = _lengths(lengths, q.shape[0], k.shape[1])
    bias = None if key_bias is None else jnp.asarray(key_bias, jnp.float32) * LOG2E
    knobs = dict(sm_scale=scale, block_q=block_q, block_k=block_k, num_warps=num_warps or dw,
                 num_stages=num_stages or ds, interpret=interpret)
    if tables is None:
        offsets = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (q.shape[0],))
        return _contiguous_call(q, k, v, lengths, offsets, bias, window=window, **knobs)
    counts = _table_counts(tables, lengths)
    return _table_call(
        q, k, v, counts, jnp.asarray(tables.full_idx), jnp.asarray(tables.part_idx),
        jnp.asarray(tables.part_tile), jnp.asarray(tables.tiles.reshape(-1, block_k)), lengths, bias, **knobs,
    )


def _table_counts(tables: patterns_lib.BlockTables, lengths: jax.Array) -> jax.Array:
    """[B, Ht, nq, 4] int32: full blocks wholly below the length, full blocks below
    ceil(length), partial blocks below ceil(length) (lists are ascending, so prefixes)."""
    bk = tables.block_k
    clean_end = (lengths // bk)[:, None, None, None]  # [B, 1, 1, 1]
    any_end = ((lengths + bk - 1) // bk)[:, None, None, None]
    full_idx, part_idx = jnp.asarray(tables.full_idx)[None], jnp.asarray(tables.part_idx)[None]  # [1, Ht, nq, F]
    full_ok = jnp.arange(full_idx.shape[-1]) < jnp.asarray(tables.full_cnt)[None, :, :, None]
    part_ok = jnp.arange(part_idx.shape[-1]) < jnp.asarray(tables.part_cnt)[None, :, :, None]
    n_clean = jnp.sum(full_ok & (full_idx < clean_end), axis=-1)  # [B, Ht, nq]
    n_full = jnp.sum(full_ok & (full_idx < any_end), axis=-1)
    n_part = jnp.sum(part_ok & (part_idx < any_end), axis=-1)
    return jnp.stack([n_clean, n_full, n_part, jnp.zeros_like(n_part)], axis=-1).astype(jnp.int32)


def _specs(q, k, block_q, num_q_blocks):
    """BlockSpecs over the grid (H, nq, B): heads innermost, query blocks reversed."""
    seq_k, d = k.shape[1], q.shape[-1]
    group = q.shape[2] // k.shape[2]
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda h, i, b: (b, num_q_blocks - 1 - i, h, 0))
    kv_spec = pl.BlockSpec((None, seq_k, None, d), lambda h, i, b: (b, 0, h // group, 0))
    return q_spec, kv_spec


@functools.partial(jax.jit, static_argnames=("window", "sm_scale", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def _contiguous_call(q, k, v, lengths, offsets, bias, *, window, sm_scale, block_q, block_k, num_warps,
                     num_stages, interpret):
    b, t, h, d = q.shape
    nq = pl.cdiv(t, block_q)
    q_spec, kv_spec = _specs(q, k, block_q, nq)
    kernel = functools.partial(
        _contiguous_kernel, window=window, seq_q=t, seq_k=k.shape[1], block_q=block_q, block_k=block_k,
        num_q_blocks=nq, qk_scale=sm_scale * LOG2E, has_bias=bias is not None,
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


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def _table_call(q, k, v, counts, full_idx, part_idx, part_tile, tiles, lengths, bias, *, sm_scale, block_q,
                block_k, num_warps, num_stages, interpret):
    b, t, h, d = q.shape
    nq = pl.cdiv(t, block_q)
    q_spec, kv_spec = _specs(q, k, block_q, nq)
    kernel = functools.partial(
        _table_kernel, seq_q=t, seq_k=k.shape[1], block_q=block_q, block_k=block_k, num_q_blocks=nq,
        qk_scale=sm_scale * LOG2E, has_bias=bias is not None, per_head=full_idx.shape[0] > 1,
    )
    extra = () if bias is None else (bias,)
    return pl.pallas_call(
        kernel,
        grid=(h, nq, b),
        in_specs=[q_spec, kv_spec, kv_spec] + [pl.no_block_spec] * (6 + len(extra)),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_prefill_sparse",
    )(q, k, v, counts, full_idx, part_idx, part_tile, tiles, lengths, *extra)


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
    import time

    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def time_fn(fn, *args, reps: int = 20) -> float:
    """Median seconds of `fn(*args)` after a compile call (each call blocked on)."""
    import statistics
    import time

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))  # a first trace may register config state that retraces once
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


TUNE_GRID = {  # (block_q, block_k, num_warps, num_stages) tried by --tune, per head_dim
    64: [(bq, bk, w, st) for bq in (64, 128) for bk in (64, 128) for w in (4, 8) for st in (2, 3, 4)],
    128: [(bq, bk, w, st) for bq in (64, 128) for bk in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)
          if not (bq == 128 and bk == 128 and st == 4)],
    256: [(bq, bk, w, st) for bq in (32, 64, 128) for bk in (32, 64) for w in (4, 8) for st in (1, 2, 3)
          if bq * bk <= 64 * 64 * 2],
}
SWEEP_PATTERNS = {
    "causal": patterns_lib.DenseCausal(),
    "window1024": patterns_lib.SlidingWindow(1024),
    "window4096": patterns_lib.SlidingWindow(4096),
    "strided": patterns_lib.anchors_strided(),
}


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Sweep flash_prefill on the GPU; TFLOP/s vs a bf16 matmul peak.")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--patterns", nargs="+", default=None, choices=list(SWEEP_PATTERNS),
                    help="default: all (with --tune: causal)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tune", action="store_true", help="try TUNE_GRID (block_q, block_k, num_warps, num_stages)")
    ap.add_argument("--check", action="store_true", help="GPU numerics against the reference first")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("this sweep needs a GPU (tests run the kernel in interpret mode on the CPU)")
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}")
    peak = matmul_peak_tflops()
    print(f"bf16 matmul peak (measured, 8192^3): {peak:.0f} TFLOP/s")
    if args.check:
        _check_numerics()
    names = args.patterns or (["causal"] if args.tune else list(SWEEP_PATTERNS))
    key = jax.random.key(0)
    for d in args.head_dim:
        grid = TUNE_GRID[d] if args.tune else [default_config(d)]
        for seq in args.seq:
            kq, kk, kv = jax.random.split(jax.random.fold_in(key, seq * d), 3)
            q = jax.random.normal(kq, (1, seq, args.heads, d), jnp.bfloat16)
            k = jax.random.normal(kk, (1, seq, args.kv_heads, d), jnp.bfloat16)
            v = jax.random.normal(kv, (1, seq, args.kv_heads, d), jnp.bfloat16)
            for name in names:
                pat = SWEEP_PATTERNS[name]
                rows = []
                for bq, bk, w, st in grid:
                    tabs = pat.block_tables(seq, seq, bq, bk)
                    flops = kept_flops(tabs, 1, args.heads, d)
                    fn = jax.jit(functools.partial(
                        flash_prefill, tables=None if pat.contiguous else tabs, window=pat.contiguous_window,
                        block_q=bq, block_k=bk, num_warps=w, num_stages=st))
                    try:
                        sec = time_fn(fn, q, k, v)
                    except Exception as e:  # a configuration Triton rejects (shared memory, registers)
                        print(f"  D={d} S={seq} {name} {bq}x{bk} w{w} s{st}: failed ({type(e).__name__})")
                        continue
                    tf = flops / sec / 1e12
                    rows.append((sec, bq, bk, w, st, tf))
                    print(f"  D={d:3d} S={seq:6d} {name:10s} bq={bq:3d} bk={bk:3d} w={w} s={st}: "
                          f"{sec * 1e3:8.3f} ms {tf:6.1f} TFLOP/s ({100 * tf / peak:4.1f}% of matmul peak)", flush=True)
                if len(rows) > 1:
                    best = min(rows)
                    print(f"BEST D={d} S={seq} {name}: ({best[1]}, {best[2]}, {best[3]}, {best[4]}) "
                          f"{best[0] * 1e3:.3f} ms {best[5]:.1f} TFLOP/s", flush=True)


def _check_numerics() -> None:
    """GPU numerics against the reference: ragged T/S, lengths, offsets, every head_dim."""
    key = jax.random.key(1)
    for d in HEAD_DIMS:
        for pat in (patterns_lib.DenseCausal(), patterns_lib.SlidingWindow(100), patterns_lib.anchors_strided(),
                    patterns_lib.BigBird(64, 16, 2, 64)):
            t, s, off = 300, 1300, 1000
            kq, kk, kv = jax.random.split(jax.random.fold_in(key, d), 3)
            q = jax.random.normal(kq, (2, t, 8, d), jnp.bfloat16)
            k = jax.random.normal(kk, (2, s, 2, d), jnp.bfloat16)
            v = jax.random.normal(kv, (2, s, 2, d), jnp.bfloat16)
            lengths = jnp.array([s, s - 37], jnp.int32)
            bq, bk, _, _ = default_config(d)
            tabs = None if pat.contiguous else pat.block_tables(t, s, bq, bk, off)
            out = flash_prefill(q, k, v, tabs, lengths=lengths, q_offset=off, window=pat.contiguous_window)
            mask = pat.token_mask(t, s, off)
            ref = flash_prefill_reference(q, k, v, mask, lengths=lengths)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            print(f"  check D={d} {patterns_lib.describe(pat)}: max |err| {err:.4f}")
            assert err < 2e-2, err


if __name__ == "__main__":
    _main()
