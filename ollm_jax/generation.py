"""Jittable generation: prefill, then decode inside one `lax.while_loop`.

`generate` is a pure function of its arguments: no host sync per token, usable
directly or inside the caller's `jax.jit`. The same two pieces (`prefill`, `decode`)
also serve the host-side streaming loop in `ollm_jax.engine`, which runs `decode` a
few tokens at a time.

Dimensions: B batch, T padded prompt length, N max_new_tokens, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from ollm_jax import kv_cache
from ollm_jax.config import ModelConfig
from ollm_jax.model import Params, forward
from ollm_jax.patterns import Pattern
from ollm_jax.sampling import SamplingParams, sample

PAD_ID = 0  # written past a row's last valid token


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries. `tokens[:, :step]` are generated."""

    tokens: jax.Array  # [B, N] int32 new tokens (PAD_ID past num_tokens)
    num_tokens: jax.Array  # [B] int32 valid new tokens per row (an EOS counts)
    done: jax.Array  # [B] bool: row hit an EOS
    step: jax.Array  # [] int32: columns of `tokens` filled so far
    prompt_lengths: jax.Array  # [B] int32
    cache: kv_cache.KVCache
    key: jax.Array


def check_prompt(cfg: ModelConfig, prompt_tokens, prompt_lengths, max_new_tokens: int) -> None:
    """Raises ValueError, naming the values, for prompts that cannot be generated from."""
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [B, T]; got shape {prompt_tokens.shape}")
    batch, prompt_len = prompt_tokens.shape
    if prompt_lengths.shape != (batch,):
        raise ValueError(f"prompt_lengths must be [B]={batch}; got shape {prompt_lengths.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be >= 1")
    total = prompt_len + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_len} + {max_new_tokens=} = {total} exceeds the model's "
            f"maximum length max_position_embeddings={cfg.max_position_embeddings}"
        )
    if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = jax.device_get(prompt_lengths)
        if (lengths < 1).any() or (lengths > prompt_len).any():
            raise ValueError(f"prompt_lengths={lengths.tolist()} must lie in [1, {prompt_len}]")


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg", "max_new_tokens", "sampling", "eos_ids", "kv_format", "attention_impl", "attention_pattern"
    ),
)
def prefill(
    params: Params,
    cfg: ModelConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_ids: tuple[int, ...],
    kv_format: str | None = None,
    attention_impl: str = "auto",
    attention_pattern: Pattern | None = None,
) -> DecodeState:
    """Runs the prompts through the model and samples the first new token."""
    batch, prompt_len = prompt_tokens.shape
    cache = kv_cache.create(cfg, batch, prompt_len + max_new_tokens, kv_format)
    t = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]  # [1, T]
    positions = jnp.where(t < prompt_lengths[:, None], t, -1)  # [B, T]
    logits, cache = forward(
        params, cfg, prompt_tokens, positions, cache,
        logits_index=(prompt_lengths - 1)[:, None], attention_impl=attention_impl,
        attention_pattern=attention_pattern, q_offset=0,
    )  # [B, 1, V]
    first = sample(logits[:, 0], jax.random.fold_in(key, 0), sampling)  # [B]
    tokens = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32).at[:, 0].set(first)
    return DecodeState(
        tokens=tokens,
        num_tokens=jnp.ones((batch,), jnp.int32),
        done=_is_eos(first, eos_ids),
        step=jnp.array(1, jnp.int32),
        prompt_lengths=prompt_lengths.astype(jnp.int32),
        cache=cache,
        key=key,
    )


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "sampling", "eos_ids", "attention_impl", "attention_pattern"),
    donate_argnames=("state",),
)
def decode(
    params: Params,
    cfg: ModelConfig,
    state: DecodeState,
    until: jax.Array | int,
    *,
    sampling: SamplingParams,
    eos_ids: tuple[int, ...],
    attention_impl: str = "auto",
    attention_pattern: Pattern | None = None,
) -> DecodeState:
    """Decodes one token per step until `state.step == until` or every row is done."""
    until = jnp.minimum(until, state.tokens.shape[1])

    def cond(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState):
        last = s.tokens[:, s.step - 1]  # [B]
        pos = jnp.where(s.done, -1, s.prompt_lengths + s.step - 1)  # [B]; finished rows write nothing
        logits, cache = forward(
            params, cfg, last[:, None], pos[:, None], s.cache, attention_impl=attention_impl,
            attention_pattern=attention_pattern,
        )  # [B, 1, V]
        new = sample(logits[:, 0], jax.random.fold_in(s.key, s.step), sampling)  # [B]
        new = jnp.where(s.done, PAD_ID, new)
        return s.replace(
            tokens=s.tokens.at[:, s.step].set(new),
            num_tokens=s.num_tokens + (~s.done).astype(jnp.int32),
            done=s.done | _is_eos(new, eos_ids),
            step=s.step + 1,
            cache=cache,
        )

    return jax.lax.while_loop(cond, body, state)


def generate(
    params: Params,
    cfg: ModelConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: tuple[int, ...] | None = None,
    kv_format: str | None = None,
    attention_impl: str = "auto",
    attention_pattern: Pattern | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Generates up to `max_new_tokens` tokens per prompt.

    A pure function: prefill, then a `lax.while_loop` that stops when every row has
    produced an EOS id or `max_new_tokens` tokens, with no host sync per token. It may
    be called directly (it jits itself) or inside `jax.jit`; then `cfg`,
    `max_new_tokens`, `temperature`, `top_k`, `top_p`, `eos_ids`, `kv_format`,
    `attention_impl` and `attention_pattern` must be static (`static_argnames`), and the prompt's padded
    length T is part of the traced shape.

    Args:
      params: parameter pytree; cfg: its `ModelConfig`.
      prompt_tokens: [B, T] int32, right-padded.
      prompt_lengths: [B] int32, 1 <= length <= T.
      key: a `jax.random` key; the token of step i is drawn with `fold_in(key, i)`.
      max_new_tokens: N, the number of new tokens at most.
      temperature: 0 for greedy; top_k (0 = off) and top_p (1.0 = off) filter sampling.
      eos_ids: token ids that end a row (the EOS is kept in the output); None means
        the config's `eos_token_ids`, () means never stop early.
      kv_format: KV cache format (None = the model's dtype; see `ollm_jax.kv_cache`).
      attention_impl: "auto" (Pallas/cuDNN kernels on a GPU, XLA on the CPU), "xla",
        "pallas" or "cudnn"; see `ollm_jax.attention.attend`.
      attention_pattern: a sparsity pattern from `ollm_jax.patterns` (e.g.
        `SlidingWindow(1024)`, `Strided(...)`, `BigBird(...)`) used instead of dense causal
        attention, in prefill and decode; None = the model's own attention.
    Returns:
      tokens [B, N] int32 (PAD_ID past each row's length) and lengths [B] int32.
    Raises:
      ValueError: bad shapes, or T + max_new_tokens over `cfg.max_position_embeddings`.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    check_prompt(cfg, prompt_tokens, prompt_lengths, max_new_tokens)
    sampling = SamplingParams(temperature, top_k, top_p)
    eos = tuple(cfg.eos_token_ids if eos_ids is None else (int(e) for e in eos_ids))
    state = prefill(
        params, cfg, prompt_tokens, prompt_lengths, key, max_new_tokens=max_new_tokens,
        sampling=sampling, eos_ids=eos, kv_format=kv_format, attention_impl=attention_impl,
        attention_pattern=attention_pattern,
    )
    state = decode(
        params, cfg, state, max_new_tokens, sampling=sampling, eos_ids=eos, attention_impl=attention_impl,
        attention_pattern=attention_pattern,
    )
    return state.tokens, state.num_tokens
