"""The one dispatch point for attention over the KV cache.

`attend` is what model code calls. It chooses an implementation for the cache type,
the hardware and the pattern; today that is the plain-JAX reference below. Pallas
kernels (flash prefill, split-K flash decode over quantized KV) plug in here, behind
the same call, with the reference as their fallback and test oracle.

Dimensions: B batch, T query tokens, S cache slots, H query heads, K KV heads,
G = H // K query heads per KV head, D head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ollm_jax import kv_cache

# Finite, so a query with no visible key (padding) gets a uniform average, not NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLS = ("auto", "xla")


def attend(
    q: jax.Array,
    layer: kv_cache.LayerCache,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Causal attention of new queries over a layer's cache (already holding their keys).

    Args:
      q: [B, T, H, D] queries, RoPE applied.
      layer: the layer's cache; slot s holds position s.
      q_positions: [B, T] absolute query positions; -1 for padding (output unused).
      sliding_window: a query at p sees keys at p - window < s <= p (Mistral); None = all.
      impl: "auto" or "xla" (the reference). Kernels join this list.
    Returns:
      [B, T, H, D] in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl=}; choose from {IMPLS}")
    k, v = kv_cache.read(layer, q.dtype)
    return attention_reference(q, k, v, q_positions, sliding_window=sliding_window)


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain-JAX softmax attention with a positional causal (optionally windowed) mask.

    q [B, T, H, D]; k, v [B, S, K, D] where slot s is position s; returns [B, T, H, D].
    Scores and the softmax are float32; probabilities meet V in V's dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)  # [B, K, G, T, S]

    k_pos = jnp.arange(k.shape[1])  # [S]
    q_pos = q_positions[:, :, None]  # [B, T, 1]
    visible = k_pos[None, None, :] <= q_pos  # [B, T, S]
    if sliding_window is not None:
        visible &= k_pos[None, None, :] > q_pos - sliding_window
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
