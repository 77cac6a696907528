"""Host-side convenience for people: text or chat messages in, text out.

Research code should call `ollm_jax.generate` directly. This module adds what a person
at a terminal wants around it: the tokenizer and chat template, prompt padding to a
few bucket sizes (so new prompt lengths rarely recompile), streaming of text as it is
produced, and timings. It runs the same jitted `prefill` and `decode` as `generate`,
with `decode` called a chunk of tokens at a time so text can be shown as it comes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ollm_jax import generation as gen
from ollm_jax.checkpoint import Model
from ollm_jax.sampling import SamplingParams

Message = dict[str, str]  # {"role": "user" | "system" | "assistant", "content": str}

_MIN_BUCKET = 32


@dataclasses.dataclass
class Completion:
    text: str
    tokens: list[int]  # new tokens, the EOS included if one was produced
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"
    prefill_s: float  # prompt processing, compilation included on first use
    decode_s: float  # steady-state decode time of `decode_tokens`
    decode_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def bucket_length(n: int, limit: int) -> int:
    """The padded prompt length: the next power of two >= n (at least 32), capped at limit."""
    size = _MIN_BUCKET
    while size < n:
        size *= 2
    return max(n, min(size, limit))


def encode_chat(model: Model, messages: Sequence[Message]) -> list[int]:
    """Renders messages with the model's chat template, ready for the assistant's turn."""
    if not getattr(model.tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use complete() with plain text")
    ids = model.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some versions
        ids = ids["input_ids"]
    return list(ids)


def complete(
    model: Model,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    kv_format: str | None = None,
    on_text: Callable[[str], None] | None = None,
    chunk: int = 16,
) -> Completion:
    """Continues a prompt (text, or token ids) and returns the new text.

    Args:
      on_text: called with each new piece of text as it is decoded (streaming).
      chunk: tokens decoded per device call between two `on_text` calls.
    Raises:
      ValueError: the prompt plus max_new_tokens does not fit the model's maximum length.
    """
    cfg, tok = model.cfg, model.tokenizer
    ids = list(tok.encode(prompt)) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    limit = cfg.max_position_embeddings - max_new_tokens
    if len(ids) > limit:
        raise ValueError(
            f"prompt of {len(ids)} tokens + {max_new_tokens=} exceeds the model's maximum "
            f"length max_position_embeddings={cfg.max_position_embeddings}"
        )
    padded = np.zeros((1, bucket_length(len(ids), limit)), np.int32)
    padded[0, : len(ids)] = ids
    sampling = SamplingParams(temperature, top_k, top_p)
    eos = tuple(cfg.eos_token_ids)
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos += (tok.eos_token_id,)

    t0 = time.perf_counter()
    state = gen.prefill(
        model.params, cfg, jnp.asarray(padded), jnp.array([len(ids)], jnp.int32), jax.random.key(seed),
        max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos, kv_format=kv_format,
    )
    shown = _Streamer(tok, on_text)
    shown.update(np.asarray(state.tokens[0, :1]))
    prefill_s = time.perf_counter() - t0

    step, steady_start, steady_from = 1, None, 1
    while step < max_new_tokens and not bool(state.done[0]):
        # The first call decodes one token and pays for compilation (`until` is traced,
        # so later chunks reuse the executable); tokens/s is timed from its end.
        until = step + (1 if steady_start is None else chunk)
        state = gen.decode(model.params, cfg, state, until, sampling=sampling, eos_ids=eos)
        n = int(state.num_tokens[0])  # syncs: this chunk is done
        if steady_start is None:
            steady_start, steady_from = time.perf_counter(), n
        step = int(state.step)
        shown.update(np.asarray(state.tokens[0, :n]))
    end = time.perf_counter()

    n = int(state.num_tokens[0])
    new = np.asarray(state.tokens[0, :n]).tolist()
    stopped = bool(state.done[0])
    return Completion(
        text=shown.text(new, strip_eos=eos),
        tokens=new,
        prompt_tokens=len(ids),
        finish_reason="stop" if stopped else "length",
        prefill_s=prefill_s,
        decode_s=(end - steady_start) if steady_start else 0.0,
        decode_tokens=n - steady_from,
    )


def chat(model: Model, messages: Sequence[Message], **kwargs) -> Completion:
    """One assistant turn for a conversation (list of {"role", "content"} dicts)."""
    return complete(model, encode_chat(model, messages), **kwargs)


class _Streamer:
    """Turns a growing token list into text deltas (safe for multi-token characters)."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text, self.emitted = tokenizer, on_text, ""

    def text(self, tokens, strip_eos=()) -> str:
        tokens = [t for t in tokens if t not in strip_eos]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def update(self, tokens) -> None:
        if self.on_text is None:
            return
        text = self.text(tokens.tolist())
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more tokens
            return
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted) :])
            self.emitted = text
