"""The one dispatch point for attention over the KV cache.

`attend` is what model code calls. It chooses an implementation for the step, the cache
format and the hardware:

  - decode (one query token per sequence, or a few: T G <= 32 with T a speculative
    verify's width): the split-K Pallas flash-decode kernel
    (`pallas_kernels.flash_decode`), which reads bf16, int8 or int4 K/V (and kivi4
    keys) directly, on a GPU; the plain-JAX reference on the CPU (or the kernel in
    interpret mode with impl="pallas", which is how CI tests it);
  - prefill: `ollm_jax.router.attention`, which picks cuDNN, the block-sparse Pallas
    flash kernel or XLA per pattern, length and card (the reference below for "xla").

The reference is the fallback and the test oracle of every kernel.

Dimensions: B batch, T query tokens, S cache slots, H query heads, K KV heads,
G = H // K query heads per KV head, D head_dim.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from ollm_jax import kv_cache, patterns, router
from pallas_kernels import on_gpu

# Finite, so a query with no visible key (padding) gets a uniform average, not NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLS = ("auto", "xla", "pallas", "cudnn")


def attend(
    q: jax.Array,
    layer: kv_cache.LayerCache,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    pattern: patterns.Pattern | None = None,
    q_offset: int | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Causal attention of new queries over a layer's cache (already holding their keys).

    Args:
      q: [B, T, H, D] queries, RoPE applied.
      layer: the layer's cache; slot s holds position s.
      q_positions: [B, T] absolute query positions, consecutive per row; -1 for padding
        (output unused).
      sliding_window: a query at p sees keys at p - window < s <= p (Mistral); None = all.
      pattern: a sparsity pattern (`ollm_jax.patterns`) replacing dense causal / the
        sliding window, for exploration.
      q_offset: the position of the first query when it is the same static number for
        every row (0 for a prefill from an empty cache; lets cuDNN and block tables be
        used); None takes it from `q_positions`.
      impl: "auto" (kernels on a GPU, references on the CPU), "xla" (the references),
        "pallas" (the kernels; interpret mode off the GPU) or "cudnn" (prefill).
    Returns:
      [B, T, H, D] in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl=}; choose from {IMPLS}")
    if pattern is None and sliding_window is not None:
        pattern = patterns.SlidingWindow(sliding_window)
    contiguous = pattern is None or pattern.contiguous
    window = None if pattern is None else pattern.contiguous_window
    if contiguous and (impl == "pallas" or (impl == "auto" and on_gpu())):
        from pallas_kernels import flash_decode  # the kernels import this package

        if flash_decode.supports(q, layer.k, layer.v):  # one query a row, or a few (speculative verify)
            return flash_decode.flash_decode(
                q, layer.k, layer.v, q_positions, sliding_window=window, interpret=not on_gpu()
            )  # [B, T, H, D]
        if impl == "pallas" and q.shape[1] == 1:
            warnings.warn(f"flash_decode does not take this cache ({type(layer.k).__name__}/"
                          f"{type(layer.v).__name__} stores, q {q.dtype}); using the reference")
    k, v = kv_cache.read(layer, q.dtype)
    if contiguous and (impl == "xla" or q.shape[1] == 1):
        return attention_reference(q, k, v, q_positions, sliding_window=window)
    lengths = jnp.max(q_positions, axis=1) + 1  # [B] keys [0, length) exist
    offset = q_positions[:, 0] if q_offset is None else q_offset
    return router.attention(
        q, k, v, pattern=pattern or patterns.DenseCausal(), impl="xla" if impl == "xla" else impl,
        q_offset=offset, lengths=lengths,
    )


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
