"""Multi-scale attention: a full-resolution recent window plus mean-pooled summaries.

The semantics are defined in `ollm_jax.patterns.MultiScale` (read that docstring first).
This file holds

  pool_kv(k, v, pattern)            -> (k_cat, v_cat, bias)  the concatenated key axis
  multiscale_attention(q, k, v, pattern, impl=...)            kernel or XLA over it
  multiscale_reference(q, k, v, window=, pools=, spans=)      plain JAX, level by level

Pooling runs in XLA (a reshape and a float32 mean: one pass over K and V, memory-bound
and small next to the attention). The attention over [summaries | cache keys] is the
block-sparse `flash_prefill` kernel driven by the pattern's tables, with the summaries'
log(P) bias as a per-key bias; the XLA path is a dense masked softmax over the same axis.
`multiscale_reference` does not use the pattern's tables or masks: it recomputes each
level's range from the definition, so it is an independent check of both.

Dimensions: B batch, T queries, S cache keys, H query heads, K KV heads, D head_dim,
C_j = S // P_j chunks at level j, S' = S + sum_j C_j.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ollm_jax import patterns as patterns_lib
from pallas_kernels import flash_prefill as fp


def _pool(x: jax.Array, pool: int) -> jax.Array:
    """[B, S, K, D] -> [B, S // pool, K, D]: float32 mean of each complete chunk."""
    b, s, kh, d = x.shape
    n = s // pool
    chunks = x[:, : n * pool].reshape(b, n, pool, kh, d).astype(jnp.float32)
    return jnp.mean(chunks, axis=2).astype(x.dtype)


def pool_kv(k: jax.Array, v: jax.Array, pattern: patterns_lib.MultiScale):
    """The concatenated key axis (coarsest level first, cache keys last).

    Returns (k_cat [B, S', K, D], v_cat [B, S', K, D], bias [S'] float32 natural log).
    """
    levels = range(len(pattern.pools), 0, -1)
    k_cat = jnp.concatenate([_pool(k, pattern.pools[j - 1]) for j in levels] + [k], axis=1)
    v_cat = jnp.concatenate([_pool(v, pattern.pools[j - 1]) for j in levels] + [v], axis=1)
    return k_cat, v_cat, jnp.asarray(pattern.key_bias(k.shape[1]))


def multiscale_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pattern: patterns_lib.MultiScale,
    *,
    q_offset: int = 0,
    lengths: jax.Array | None = None,
    impl: str = "pallas",
    interpret: bool = False,
    sm_scale: float | None = None,
    **knobs,
) -> jax.Array:
    """Multi-scale attention of q [B, T, H, D] over the cache k, v [B, S, K, D].

    impl "pallas" runs the block-sparse kernel (interpret mode if `interpret`); "xla" a
    dense masked softmax. q_offset must be a Python int for "pallas" (tables are static);
    "xla" also takes a traced scalar or [B] offsets.
    Returns [B, T, H, D].
    """
    t, s = q.shape[1], k.shape[1]
    k_cat, v_cat, bias = pool_kv(k, v, pattern)
    n_pooled = k_cat.shape[1] - s
    lengths_cat = None if lengths is None else jnp.asarray(lengths, jnp.int32) + n_pooled
    if impl == "pallas":
        bq = knobs.pop("block_q", None) or fp.default_config(q.shape[-1])[0]
        bk = knobs.pop("block_k", None) or fp.default_config(q.shape[-1])[1]
        tables = pattern.block_tables(t, s, bq, bk, int(q_offset))
        return fp.flash_prefill(q, k_cat, v_cat, tables, lengths=lengths_cat, key_bias=bias, sm_scale=sm_scale,
                                interpret=interpret, **knobs)
    if impl != "xla":
        raise ValueError(f"multi-scale attention has impl 'pallas' or 'xla', not {impl!r}")
    off = jnp.asarray(q_offset, jnp.int32)
    if off.ndim == 0:
        mask = pattern.mask(off + jnp.arange(t)[:, None], jnp.arange(k_cat.shape[1])[None, :], jnp, seq_k=s)  # [T, S']
    else:  # per-sequence offsets: [B, 1, T, S']
        p = off[:, None, None] + jnp.arange(t)[None, :, None]
        mask = pattern.mask(p, jnp.arange(k_cat.shape[1])[None, None, :], jnp, seq_k=s)[:, None]
    return fp.flash_prefill_reference(q, k_cat, v_cat, mask, lengths=lengths_cat, key_bias=bias, sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("window", "pools", "spans", "q_offset", "sm_scale"))
def multiscale_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    pools: tuple[int, ...],
    spans: tuple[int, ...],
    q_offset: int = 0,
    lengths: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """The definition, level by level, in float32.

    For the query at p: keys [a_0, p] at full resolution, with
    a_0 = floor(max(0, p - window + 1) / P_1) * P_1; level j's chunks of P_j keys
    covering [a_j, a_{j-1}), a_j = floor(max(0, a_{j-1} - spans[j-1]) / P_{j+1}) * P_{j+1},
    a_L = 0. A chunk's key and value are the means of its keys and values; its score
    gets + log(P_j). Keys at s >= lengths[b] are invisible. One softmax over all levels.
    """
    b, t, h, d = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, kv_heads, g, d).astype(jnp.float32)  # [B, T, K, G, D]
    p = q_offset + jnp.arange(t)  # [T]
    length = s_len if lengths is None else jnp.asarray(lengths)[:, None, None, None, None]

    # Level boundaries for every query.
    bounds = [(jnp.maximum(p - window + 1, 0) // pools[0]) * pools[0]]
    for j in range(1, len(pools)):
        bounds.append((jnp.maximum(bounds[-1] - spans[j - 1], 0) // pools[j]) * pools[j])
    bounds.append(jnp.zeros_like(p))

    scores, values = [], []
    # Level 0: the cache keys.
    s0 = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale  # [B, K, G, T, S]
    pos = jnp.arange(s_len)
    vis0 = (pos[None, :] >= bounds[0][:, None]) & (pos[None, :] <= p[:, None])  # [T, S]
    vis0 = vis0[None, None, None] & (pos < length)
    scores.append(jnp.where(vis0, s0, -jnp.inf))
    values.append(v.astype(jnp.float32))
    for j, pool in enumerate(pools, start=1):
        n = s_len // pool
        kj = k[:, : n * pool].astype(jnp.float32).reshape(b, n, pool, kv_heads, d).mean(axis=2)  # [B, C, K, D]
        vj = v[:, : n * pool].astype(jnp.float32).reshape(b, n, pool, kv_heads, d).mean(axis=2)
        # Match the kernel's storage: summaries are kept in the input dtype.
        kj, vj = kj.astype(k.dtype).astype(jnp.float32), vj.astype(v.dtype).astype(jnp.float32)
        sj = jnp.einsum("btkgd,bckd->bkgtc", qg, kj) * scale + math.log(pool)  # [B, K, G, T, C]
        start = jnp.arange(n) * pool  # chunk c covers [c*P, (c+1)*P)
        visj = (start[None, :] >= bounds[j][:, None]) & (start[None, :] < bounds[j - 1][:, None])  # [T, C]
        scores.append(jnp.where(visj[None, None, None], sj, -jnp.inf))
        values.append(vj)
    s_all = jnp.concatenate(scores, axis=-1)
    m = jnp.max(s_all, axis=-1, keepdims=True)
    w = jnp.exp(s_all - jnp.where(jnp.isfinite(m), m, 0.0))
    w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
    v_all = jnp.concatenate(values, axis=1)  # [B, S', K, D] (level order irrelevant: same split as scores)
    out = jnp.einsum("bkgts,bskd->btkgd", w, v_all)
    return out.reshape(b, t, h, d).astype(q.dtype)
