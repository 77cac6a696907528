"""The KV cache: one pytree value passed into the model and returned by it.

This module is the only owner of the cache layout. Model code sees four calls:

  create(cfg, batch, max_len, kv_format)   -> KVCache
  write(layer, k, v, positions)             -> LayerCache   (append/update)
  read(layer)                               -> (k, v) for the attention reference
  advance(cache, positions) / lengths       -> valid tokens per sequence

Quantized (int8/int4) and paged formats are further `LayerCache` types with their own
`write`/`read`; the attention dispatch (`ollm_jax.attention`) may also read them
directly. Model code does not change when a format is added.

Dimensions: B batch, S cache slots (max length), T new tokens, K KV heads, D head_dim.

Positions convention: `positions[b, t]` is the absolute position of new token t of
sequence b, or -1 for padding. Padding is never written and never counts in `lengths`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ollm_jax.config import ModelConfig

KV_FORMATS = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}


@struct.dataclass
class LayerCache:
    """Contiguous cache of one layer: k and v are [B, S, K, D] in bf16/fp32/fp16."""

    k: jax.Array
    v: jax.Array


@struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    lengths: jax.Array  # [B] int32: valid (written) tokens per sequence

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[1]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def resolve_format(cfg: ModelConfig, kv_format: str | None) -> str:
    """`None` means "the model's own dtype"."""
    if kv_format is None:
        kv_format = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[cfg.dtype]
    if kv_format not in KV_FORMATS:
        raise ValueError(f"unsupported {kv_format=}; supported: {', '.join(KV_FORMATS)}")
    return kv_format


def create(cfg: ModelConfig, batch: int, max_len: int, kv_format: str | None = None) -> KVCache:
    """An empty cache of `max_len` slots per sequence (all lengths 0)."""
    dtype = KV_FORMATS[resolve_format(cfg, kv_format)]
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)  # [B, S, K, D]
    layers = tuple(
        LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)
    )
    return KVCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def bytes_per_token(cfg: ModelConfig, kv_format: str | None = None) -> int:
    """Bytes one token occupies in the cache, over all layers (K and V)."""
    itemsize = jnp.dtype(KV_FORMATS[resolve_format(cfg, kv_format)]).itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def write(layer: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Stores new keys/values at their positions.

    Args:
      layer: the layer's cache, k/v [B, S, K, D].
      k, v: [B, T, K, D] new keys and values (RoPE already applied to k).
      positions: [B, T] int32 absolute positions; -1 marks padding (not written).
    """
    max_len = layer.k.shape[1]
    # Padding and positions past the end go to index S, which mode="drop" discards.
    slots = jnp.where((positions >= 0) & (positions < max_len), positions, max_len)  # [B, T]
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
    return LayerCache(
        k=layer.k.at[rows, slots].set(k.astype(layer.k.dtype), mode="drop"),
        v=layer.v.at[rows, slots].set(v.astype(layer.v.dtype), mode="drop"),
    )


def read(layer: LayerCache) -> tuple[jax.Array, jax.Array]:
    """Keys and values as dense [B, S, K, D] arrays (slot s holds position s)."""
    return layer.k, layer.v


def advance(cache: KVCache, layers: tuple[LayerCache, ...], positions: jax.Array) -> KVCache:
    """The cache with new layers and lengths grown to cover the positions written."""
    written = jnp.max(jnp.where(positions >= 0, positions + 1, 0), axis=1)  # [B]
    return KVCache(layers=tuple(layers), lengths=jnp.maximum(cache.lengths, written.astype(jnp.int32)))


def set_lengths(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Rolls lengths back (or forward) without touching the stored data: slots past a
    sequence's length are ignored by attention and overwritten by later writes."""
    return cache.replace(lengths=lengths.astype(jnp.int32))
