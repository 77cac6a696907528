"""Sampling rules: pure `(logits, key) -> tokens` functions used inside jitted steps.

`SamplingParams` is hashable (a static argument under jit). `processed_logits` applies
temperature, top-k and top-p and is shared by plain sampling and (later) speculative
decoding, so target and draft distributions are filtered the same way.

Dimensions: B batch, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus). logits [B, V] -> [B, V] float32,
    with filtered-out entries at -inf."""
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k > 0:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        kept = jnp.where(mass_before < params.top_p, sorted_logits, jnp.inf)
        cutoff = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Draws one token per row. logits [B, V] -> [B] int32."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed_logits(logits, params), axis=-1).astype(jnp.int32)
