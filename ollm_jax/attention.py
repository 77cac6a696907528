"""The one dispatch point for attention over the KV cache.

`attend` is what model code calls. It chooses an implementation for the step, the cache
format and the hardware:

  - decode (one query token per sequence): the split-K Pallas flash-decode kernel
    (`pallas_kernels.flash_decode`), which reads bf16, int8 or int4 K/V directly, on a
    GPU; the plain-JAX reference on the CPU (or the kernel in interpret mode with
    impl="pallas", which is how CI tests it);
  - prefill: the plain-JAX reference below.

The reference is the fallback and the test oracle of every kernel.

Dimensions: B batch, T query tokens, S cache slots, H query heads, K KV heads,
G = H // K query heads per KV head, D head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ollm_jax import kv_cache
from pallas_kernels import on_gpu

# Finite, so a query with no visible key (padding) gets a uniform average, not NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLS = ("auto", "xla", "pallas")


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
      impl: "auto" (kernel on a GPU, reference on the CPU), "xla" (the reference) or
        "pallas" (the kernel; interpret mode off the GPU).
    Returns:
      [B, T, H, D] in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl=}; choose from {IMPLS}")
    if q.shape[1] == 1 and _use_kernel(impl):
        from pallas_kernels import flash_decode  # the kernels import this package

        out = flash_decode.flash_decode(
            q[:, 0], layer.k, layer.v, q_positions[:, 0], sliding_window=sliding_window,
            interpret=not on_gpu(),
        )  # [B, H, D]
        return out[:, None]
    k, v = kv_cache.read(layer, q.dtype)
    return attention_reference(q, k, v, q_positions, sliding_window=sliding_window)


def _use_kernel(impl: str) -> bool:
    return impl == "pallas" or (impl == "auto" and on_gpu())


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
