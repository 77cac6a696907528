"""Speculative decoding as one `lax.while_loop`: a drafter proposes, the target verifies.

One iteration of the loop is one *round*, for every row at once:

  1. The drafter proposes up to G = `num_draft_tokens` tokens per row: a draft model
     decoding autoregressively with its own KV cache (g <= G steps, g adapted to the
     running acceptance rate in an inner `lax.while_loop`; or, with a fixed draft
     length, all G steps unrolled into the round: XLA's GPU while loop reads its
     condition on the host every iteration, and unrolled a 1B draft step in the round
     fell from 1.08 to 0.96 of its plain decode step on an H200), or prompt lookup
     (the tokens that followed the most recent earlier occurrence of the context's last
     n-gram, n = 3, 2, 1; no model).
  2. The target runs once over [x_P, d_1 .. d_G] at positions P .. P + G, where x_P is the
     row's last token and P its own position: rows progress raggedly. Positions of
     tokens not drafted are -1 (padding: not written, output unused).
  3. Acceptance. Greedy: keep the drafts equal to the target's argmax. Sampling: exact
     rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_i with
     probability min(1, p(d_i) / q(d_i)); at the first rejection draw from
     normalize(max(0, p - q)); so every emitted token is distributed as the target's
     own sample. Then one more token comes from the target: that correction, or the
     bonus token after g accepted drafts. A round emits 1 .. g + 1 tokens per row.
  4. Both caches are rolled back to what was accepted with `kv_cache.set_lengths`, never
     recomputed: slots past a length are stale, masked by position in attention and
     overwritten by later writes.

Cache invariants at the start of a round (P = prompt length + new tokens - 1):
  target cache: positions [0, P) (x_P itself is fed by the verify pass);
  draft cache:  positions [0, P) or [0, P - 1): after a round in which all g drafts were
  accepted the draft has seen neither d_g nor the bonus token, so its first step of the
  next round feeds two tokens [x_{P-1}, x_P] (x_{P-1} masked when already cached).

Temperature, top-k and top-p go through `sampling.processed_logits` for target and draft
alike, so p and q are the distributions each would sample from. EOS and
`max_new_tokens` behave as in `generate()`: a row ends at its first EOS (kept), output is
cut at `max_new_tokens` even when a round accepted more, and PAD_ID fills the rest.

Dimensions: B batch, T padded prompt length, N max_new_tokens, C = T + N context slots,
G num_draft_tokens (the static maximum draft length), V vocab.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ollm_jax import kv_cache
from ollm_jax.config import ModelConfig
from ollm_jax.generation import PAD_ID, _is_eos, check_prompt, prefill
from ollm_jax.model import Params, forward, param_bytes
from ollm_jax.sampling import SamplingParams, processed_logits

PROMPT_LOOKUP = "prompt_lookup"
PROMPT_LOOKUP_MAX_NGRAM = 3  # longest suffix n-gram prompt lookup tries first
ACCEPTANCE_RULES = ("exact", "always", "target")  # the last two are deliberately wrong (tests)
_EMA_DECAY = 0.8  # weight of the previous rounds in the running acceptance rate
_PRIOR = (3.2, 4.0)  # (accepted, examined) pseudo-counts: acceptance 0.8 before any round
_MIN_DRAFT_COST = 0.02  # draft step cost / target step cost never assumed below this


@struct.dataclass
class SpeculativeStats:
    """Counters of one `speculative_generate` call, per row ([B] int32)."""

    target_steps: jax.Array  # verify passes the row took part in (one per round while unfinished)
    drafted_tokens: jax.Array  # draft tokens proposed to the target
    accepted_tokens: jax.Array  # draft tokens the target accepted (before the max_new_tokens cut)


@struct.dataclass
class SpeculativeState:
    """Everything the loop carries. Row b's tokens are context[b, :prompt_lengths[b] + num_tokens[b]]."""

    context: jax.Array  # [B, C] int32: the prompt, then the new tokens
    prompt_lengths: jax.Array  # [B] int32
    num_tokens: jax.Array  # [B] int32 new tokens so far (an EOS counts)
    done: jax.Array  # [B] bool: EOS or max_new_tokens reached
    cache: kv_cache.KVCache  # the target's
    draft_cache: kv_cache.KVCache | None  # the draft model's; None for prompt lookup
    gamma: jax.Array  # [] int32: draft length of the next round, in [1, G]
    accepted_ema: jax.Array  # [] float32: decayed sum of accepted drafts (all rows)
    examined_ema: jax.Array  # [] float32: decayed sum of drafts the rule looked at
    step: jax.Array  # [] int32: rounds so far
    stats: SpeculativeStats
    key: jax.Array


# ----------------------------------------------------------------------------- drafters


def prompt_lookup(context: jax.Array, last: jax.Array, num_draft: int,
                  max_ngram: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Drafts the tokens that followed the most recent earlier match of the context's last
    n-gram (the longest n in max_ngram .. 1 that matches), on device.

    A match at j (context[j : j + n] == the last n tokens, j + n <= last) proposes
    context[j + n], context[j + n + 1], ...; past the row's last token the continuation
    repeats with period last + 1 - (j + n), the distance to the match (a repeating text).

    Args:
      context: [B, C] int32 tokens; row b is valid up to index last[b].
      last: [B] int32 index of each row's last token.
      num_draft: G, the number of tokens to propose.
      max_ngram: the longest n tried (default PROMPT_LOOKUP_MAX_NGRAM).
    Returns:
      drafts [B, G] int32 and their count [B] int32 (G where a match exists, else 0).
    """
    max_ngram = max_ngram or PROMPT_LOOKUP_MAX_NGRAM
    batch, slots = context.shape
    j = jnp.arange(slots, dtype=jnp.int32)[None, :]  # [1, C] candidate match starts
    start = jnp.full((batch,), -1, jnp.int32)  # [B] first continuation index, -1 = none
    for n in range(1, max_ngram + 1):  # a longer match overrides a shorter one
        padded = jnp.pad(context, ((0, 0), (0, n)))  # [B, C + n]
        match = (j + n <= last[:, None]) & (last[:, None] >= n - 1)  # [B, C]
        for k in range(n):
            want = jnp.take_along_axis(context, jnp.maximum(last - n + 1 + k, 0)[:, None], axis=1)  # [B, 1]
            match &= padded[:, k : k + slots] == want
        recent = jnp.max(jnp.where(match, j, -1), axis=1)  # [B] the most recent match
        start = jnp.where(recent >= 0, recent + n, start)
    period = jnp.maximum(last + 1 - start, 1)  # [B]
    i = jnp.arange(num_draft, dtype=jnp.int32)[None, :]  # [1, G]
    index = jnp.clip(start[:, None] + i % period[:, None], 0, slots - 1)  # [B, G]
    drafts = jnp.take_along_axis(context, index, axis=1)  # [B, G]
    count = jnp.where(start >= 0, num_draft, 0).astype(jnp.int32)  # [B]
    return drafts, count


def _draft_sample(logits: jax.Array, key: jax.Array, sampling: SamplingParams):
    """One draft token per row and (when sampling) the distribution it came from.
    logits [B, V] -> (tokens [B] int32, probs [B, V] float32 or None)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    processed = processed_logits(logits, sampling)  # [B, V]
    tokens = jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
    return tokens, jax.nn.softmax(processed, axis=-1)


def _draft_model(draft_params: Params, draft_cfg: ModelConfig, s: SpeculativeState, last_pos: jax.Array,
                 active: jax.Array, gamma: jax.Array | int, num_draft: int, key: jax.Array,
                 sampling: SamplingParams, attention_impl: str):
    """Runs the draft model `gamma` steps (1 <= gamma <= G; steps past gamma are not run):
    a traced gamma as a `lax.fori_loop`, a static one unrolled.

    Returns drafts [B, G] int32 (PAD_ID past gamma), their distributions [B, G, V]
    (None when greedy) and the draft cache (lengths not yet rolled back)."""
    batch = last_pos.shape[0]
    rows = jnp.arange(batch)
    prev_tok = s.context[rows, last_pos - 1]  # [B] x_{P-1}
    last_tok = s.context[rows, last_pos]  # [B] x_P
    # Step 0 feeds x_{P-1} too when the previous round left it out of the draft cache;
    # valid positions come first (kivi4 caches need consecutive positions, then -1s).
    behind = (s.draft_cache.lengths < last_pos)[:, None]  # [B, 1]
    tokens = jnp.where(behind, jnp.stack([prev_tok, last_tok], 1), jnp.stack([last_tok, prev_tok], 1))  # [B, 2]
    p = last_pos[:, None]  # [B, 1]
    pos = jnp.where(behind, jnp.concatenate([p - 1, p], 1), jnp.concatenate([p, jnp.full_like(p, -1)], 1))
    pos = jnp.where(active[:, None], pos, -1)  # [B, 2]
    logits, cache = forward(
        draft_params, draft_cfg, tokens, pos, s.draft_cache,
        logits_index=behind.astype(jnp.int32), attention_impl=attention_impl,
    )  # [B, 1, V]
    first, probs = _draft_sample(logits[:, 0], jax.random.fold_in(key, 0), sampling)
    drafts = jnp.full((batch, num_draft), PAD_ID, jnp.int32).at[:, 0].set(first)  # [B, G]
    q = None
    if probs is not None:
        q = jnp.zeros((batch, num_draft, probs.shape[-1]), jnp.float32).at[:, 0].set(probs)  # [B, G, V]

    def body(i, carry):
        drafts, q, cache = carry
        pos = jnp.where(active, last_pos + i, -1)[:, None]  # [B, 1]
        logits, cache = forward(
            draft_params, draft_cfg, drafts[:, i - 1][:, None], pos, cache, attention_impl=attention_impl
        )  # [B, 1, V]
        tok, probs = _draft_sample(logits[:, 0], jax.random.fold_in(key, i), sampling)
        drafts = drafts.at[:, i].set(tok)
        if q is not None:
            q = q.at[:, i].set(probs)
        return drafts, q, cache

    carry = (drafts, q, cache)
    if isinstance(gamma, int):  # fixed: no loop, so no host round trip per step
        for i in range(1, gamma):
            carry = body(i, carry)
    else:
        carry = jax.lax.fori_loop(1, gamma, body, carry)
    return carry


# ----------------------------------------------------------------------------- acceptance


def accept(target_logits: jax.Array, drafts: jax.Array, num_drafted: jax.Array, draft_probs: jax.Array | None,
           key: jax.Array, sampling: SamplingParams, rule: str = "exact") -> tuple[jax.Array, jax.Array]:
    """Accepts a prefix of the drafts and draws the target's next token.

    Args:
      target_logits: [B, G + 1, V]; entry i is the target's distribution for the token
        after x_P, d_1 .. d_i.
      drafts: [B, G] int32 draft tokens d_1 .. d_G.
      num_drafted: [B] int32, the drafts that count (the rest are ignored).
      draft_probs: [B, G, V] the draft's distributions q_1 .. q_G, or None for a
        deterministic drafter (prompt lookup: q is a point mass on the draft).
      key: for the acceptance draws and the correction/bonus token.
      sampling: greedy (temperature 0) or the sampling filters.
      rule: "exact"; "always" (accept every draft) and "target" (on rejection draw from
        p, not from the residual) are wrong on purpose, for the distribution test.
    Returns:
      num_accepted [B] int32 (<= num_drafted) and the next token [B] int32.
    """
    if rule not in ACCEPTANCE_RULES:
        raise ValueError(f"unknown acceptance {rule=}; choose from {ACCEPTANCE_RULES}")
    batch, width, vocab = target_logits.shape
    g = width - 1
    offs = jnp.arange(g)[None, :]  # [1, G]
    valid = offs < num_drafted[:, None]  # [B, G]
    if sampling.greedy:
        best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, G + 1]
        ok = drafts == best[:, :g]
    else:
        processed = processed_logits(target_logits.reshape(batch * width, vocab), sampling)
        p = jax.nn.softmax(processed, axis=-1).reshape(batch, width, vocab)  # [B, G + 1, V]
        p_d = jnp.take_along_axis(p[:, :g], drafts[..., None], axis=-1)[..., 0]  # [B, G]
        q_d = 1.0 if draft_probs is None else jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        u = jax.random.uniform(jax.random.fold_in(key, 0), (batch, g))  # [B, G]
        ok = u * q_d < p_d  # accept with probability min(1, p / q)
    if rule == "always":
        ok = jnp.ones_like(ok)
    num_accepted = jnp.sum(jnp.cumprod(ok & valid, axis=1), axis=1).astype(jnp.int32)  # [B]
    if sampling.greedy:
        return num_accepted, jnp.take_along_axis(best, num_accepted[:, None], axis=1)[:, 0]
    rows = jnp.arange(batch)
    p_next = p[rows, num_accepted]  # [B, V]
    rejected = num_accepted < num_drafted  # [B]; else the bonus token, drawn from p itself
    at = jnp.minimum(num_accepted, g - 1)
    if draft_probs is None:
        q_next = jax.nn.one_hot(drafts[rows, at], vocab, dtype=p.dtype)  # [B, V]
    else:
        q_next = draft_probs[rows, at]  # [B, V]
    residual = jnp.maximum(p_next - jnp.where(rejected[:, None], q_next, 0.0), 0.0)  # [B, V]
    if rule == "target":
        residual = p_next
    # p == q up to rounding leaves nothing: then rejection had probability ~0; fall back to p.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_next)
    nxt = jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(residual), axis=-1).astype(jnp.int32)
    return num_accepted, nxt


def _best_gamma(alpha: jax.Array, draft_cost: float, num_draft: int) -> jax.Array:
    """The draft length g in [1, G] that maximises expected tokens per unit of time,
    sum_{k<=g} alpha^k / (g * draft_cost + 1) (target verify cost taken as 1)."""
    g = jnp.arange(1, num_draft + 1, dtype=jnp.float32)  # [G]
    tokens = jnp.cumsum(alpha ** jnp.arange(num_draft + 1, dtype=jnp.float32))[1:]  # [G]
    return (jnp.argmax(tokens / (g * draft_cost + 1.0)) + 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the loop


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "draft_cfg", "num_draft_tokens", "max_new_tokens", "sampling", "eos_ids",
                     "kv_format", "attention_impl", "adaptive_gamma", "rule"),
)
def run(
    params: Params,
    cfg: ModelConfig,
    draft_params: Params | None,
    draft_cfg: ModelConfig | None,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    initial_gamma: jax.Array | int | None = None,
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_ids: tuple[int, ...],
    kv_format: str | None = None,
    attention_impl: str = "auto",
    adaptive_gamma: bool = True,
    rule: str = "exact",
) -> SpeculativeState:
    """Prefill, then the speculative loop; returns the final state (caches included).

    `draft_cfg` None means prompt lookup. `initial_gamma` (traced; default G) is the
    first round's draft length; with `adaptive_gamma=False` every round uses it, which
    lets a benchmark vary the draft length without recompiling. With neither (a fixed
    draft length G) the draft steps are unrolled.
    See `speculative_generate` for the other arguments.
    """
    batch, prompt_len = prompt_tokens.shape
    big_g, n = num_draft_tokens, max_new_tokens
    slots = prompt_len + n
    rows = jnp.arange(batch)
    first = prefill(
        params, cfg, prompt_tokens, prompt_lengths, key, max_new_tokens=n, sampling=sampling,
        eos_ids=eos_ids, kv_format=kv_format, attention_impl=attention_impl,
    )
    context = jnp.pad(prompt_tokens, ((0, 0), (0, n))).at[rows, prompt_lengths].set(first.tokens[:, 0])  # [B, C]

    draft_cache = None
    draft_cost = 0.0
    if draft_cfg is not None:
        draft_cache = kv_cache.create(draft_cfg, batch, slots, kv_format)
        t = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]  # [1, T]
        _, draft_cache = forward(
            draft_params, draft_cfg, prompt_tokens, jnp.where(t < prompt_lengths[:, None], t, -1), draft_cache,
            logits_index=(prompt_lengths - 1)[:, None], attention_impl=attention_impl, q_offset=0,
        )  # logits unused (dropped by XLA): the draft's first token comes from the loop
        # Memory-bound decoding: a step costs about the bytes of weights it reads.
        draft_cost = max(param_bytes(draft_params) / param_bytes(params), _MIN_DRAFT_COST)

    zeros = jnp.zeros((batch,), jnp.int32)
    gamma0 = big_g if initial_gamma is None else initial_gamma
    state = SpeculativeState(
        context=context,
        prompt_lengths=prompt_lengths,
        num_tokens=jnp.ones((batch,), jnp.int32),
        done=first.done | (n <= 1),
        cache=first.cache,
        draft_cache=draft_cache,
        gamma=jnp.clip(jnp.asarray(gamma0, jnp.int32), 1, big_g),
        accepted_ema=jnp.array(_PRIOR[0], jnp.float32),
        examined_ema=jnp.array(_PRIOR[1], jnp.float32),
        step=jnp.array(1, jnp.int32),
        stats=SpeculativeStats(zeros, zeros, zeros),
        key=key,
    )

    # A fixed draft length stays a Python int, so `_draft_model` unrolls its steps.
    fixed_gamma = not adaptive_gamma and initial_gamma is None

    def cond(s: SpeculativeState):
        return (s.step < n) & ~jnp.all(s.done)  # a round emits >= 1 token per unfinished row

    def body(s: SpeculativeState):
        active = ~s.done  # [B]
        last_pos = s.prompt_lengths + s.num_tokens - 1  # [B] P, position of the last token
        round_key = jax.random.fold_in(s.key, s.step)
        gamma = big_g if fixed_gamma else s.gamma  # the draft model's length this round (unused by lookup)

        # 1. Draft.
        if draft_cfg is None:
            drafts, num_drafted = prompt_lookup(s.context, last_pos, big_g)  # [B, G], [B]
            draft_probs, draft_cache = None, None
        else:
            drafts, draft_probs, draft_cache = _draft_model(
                draft_params, draft_cfg, s, last_pos, active, gamma, big_g,
                jax.random.fold_in(round_key, 0), sampling, attention_impl,
            )
            num_drafted = jnp.full((batch,), gamma, jnp.int32)
        num_drafted = jnp.where(active, num_drafted, 0)

        # 2. Verify: x_P and the drafts at P .. P + G, in one target pass.
        offs = jnp.arange(big_g + 1, dtype=jnp.int32)[None, :]  # [1, G + 1]
        verify_tokens = jnp.concatenate([s.context[rows, last_pos][:, None], drafts], axis=1)  # [B, G + 1]
        verify_pos = jnp.where(active[:, None] & (offs <= num_drafted[:, None]), last_pos[:, None] + offs, -1)
        logits, cache = forward(
            params, cfg, verify_tokens, verify_pos, s.cache, attention_impl=attention_impl
        )  # [B, G + 1, V]

        # 3. Accept, then one token from the target.
        num_accepted, nxt = accept(
            logits, drafts, num_drafted, draft_probs, jax.random.fold_in(round_key, 1), sampling, rule
        )  # [B], [B]
        emitted = jnp.where(
            offs < num_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
            jnp.where(offs == num_accepted[:, None], nxt[:, None], PAD_ID),
        )  # [B, G + 1]
        take = jnp.where(active, jnp.minimum(num_accepted + 1, n - s.num_tokens), 0)  # [B]
        is_eos = _is_eos(emitted, eos_ids) & (offs < take[:, None])  # [B, G + 1]
        hit = jnp.any(is_eos, axis=1)
        take = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, take)
        write_at = jnp.where(offs < take[:, None], last_pos[:, None] + 1 + offs, slots)  # [B, G + 1]
        context = s.context.at[rows[:, None], write_at].set(emitted, mode="drop")
        num_tokens = s.num_tokens + take

        # 4. Roll back: the target keeps x_P, d_1 .. d_a; the draft at most what it has seen.
        new_last = last_pos + take
        cache = kv_cache.set_lengths(cache, jnp.where(active, new_last, s.cache.lengths))
        if draft_cache is not None:
            draft_cache = kv_cache.set_lengths(
                draft_cache, jnp.where(active, jnp.minimum(new_last, last_pos + gamma), s.draft_cache.lengths)
            )

        # Adapt the draft length to the running acceptance rate (all rows pooled).
        accepted = jnp.where(active, num_accepted, 0)
        examined = jnp.where(active & (num_accepted < num_drafted), num_accepted + 1, accepted)
        accepted_ema = _EMA_DECAY * s.accepted_ema + jnp.sum(accepted)
        examined_ema = _EMA_DECAY * s.examined_ema + jnp.sum(examined)
        next_gamma = s.gamma
        if adaptive_gamma and draft_cfg is not None:
            next_gamma = _best_gamma(accepted_ema / jnp.maximum(examined_ema, 1e-6), draft_cost, big_g)

        stats = SpeculativeStats(
            target_steps=s.stats.target_steps + active.astype(jnp.int32),
            drafted_tokens=s.stats.drafted_tokens + num_drafted,
            accepted_tokens=s.stats.accepted_tokens + accepted,
        )
        return s.replace(
            context=context, num_tokens=num_tokens, done=s.done | hit | (num_tokens >= n), cache=cache,
            draft_cache=draft_cache, gamma=next_gamma, accepted_ema=accepted_ema, examined_ema=examined_ema,
            step=s.step + 1, stats=stats,
        )

    return jax.lax.while_loop(cond, body, state)


def output_tokens(state: SpeculativeState, max_new_tokens: int) -> jax.Array:
    """The new tokens [B, N] of a final state, PAD_ID past each row's count."""
    i = jnp.arange(max_new_tokens, dtype=jnp.int32)[None, :]  # [1, N]
    tokens = jnp.take_along_axis(state.context, state.prompt_lengths[:, None] + i, axis=1)  # [B, N]
    return jnp.where(i < state.num_tokens[:, None], tokens, PAD_ID)


def check_draft(cfg: ModelConfig, draft: Any) -> ModelConfig | None:
    """Validates `draft`; returns the draft model's config, or None for prompt lookup."""
    if isinstance(draft, str):
        if draft != PROMPT_LOOKUP:
            raise ValueError(f"unknown {draft=}; pass (draft_params, draft_cfg) or {PROMPT_LOOKUP!r}")
        return None
    if not (isinstance(draft, tuple | list) and len(draft) == 2 and isinstance(draft[1], ModelConfig)):
        raise ValueError(f"draft must be (draft_params, draft_cfg: ModelConfig) or {PROMPT_LOOKUP!r}; "
                         f"got {type(draft).__name__}")
    draft_cfg = draft[1]
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"draft and target must share a tokenizer: draft vocab_size={draft_cfg.vocab_size} "
                         f"!= target vocab_size={cfg.vocab_size}")
    if None not in (draft_cfg.bos_token_id, cfg.bos_token_id) and draft_cfg.bos_token_id != cfg.bos_token_id:
        raise ValueError(f"draft and target must share a tokenizer: draft bos_token_id={draft_cfg.bos_token_id} "
                         f"!= target bos_token_id={cfg.bos_token_id}")
    return draft_cfg


def speculative_generate(
    params: Params,
    cfg: ModelConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    *,
    draft: tuple[Params, ModelConfig] | str,
    num_draft_tokens: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: tuple[int, ...] | None = None,
    kv_format: str | None = None,
    attention_impl: str = "auto",
    adaptive_gamma: bool = True,
    _acceptance: str = "exact",
) -> tuple[jax.Array, jax.Array, SpeculativeStats]:
    """Generates like `generate()`, with a drafter proposing tokens the target verifies.

    Greedy output is token for token the target's greedy `generate()` output; sampled
    output has exactly the target's distribution (rejection sampling). Prefill, then one
    `lax.while_loop` (see the module docstring); no host sync per round. It may be called
    directly (it jits itself) or inside `jax.jit`: then `cfg`, the draft's config (close
    over it), `draft` when a string, and every keyword argument but `key` must be static.

    Args:
      params: the target's parameter pytree; cfg: its `ModelConfig`.
      prompt_tokens: [B, T] int32, right-padded; prompt_lengths: [B] int32 in [1, T].
      key: a `jax.random` key.
      draft: (draft_params, draft_cfg), a model sharing the target's tokenizer, or
        "prompt_lookup" (drafts copied from the prompt and output; no model).
      num_draft_tokens: G >= 1, the most tokens drafted per round; the target verifies
        G + 1 positions per round.
      max_new_tokens: N, the number of new tokens at most.
      temperature, top_k, top_p: as in `generate()`; applied to target and draft alike.
      eos_ids: as in `generate()` (None = the target config's `eos_token_ids`).
      kv_format: KV cache format of both models (see `ollm_jax.kv_cache`).
      attention_impl: see `ollm_jax.attention.attend`.
      adaptive_gamma: a draft model drafts g tokens per round, g in [1, G] chosen from the
        running acceptance rate (all rows pooled) and the draft/target weight-bytes ratio
        to maximise expected tokens per unit of time; False drafts G every round, its
        steps unrolled (faster per step on a GPU: see the module docstring).
        Prompt lookup always proposes G (drafting is free and the verify width static).
    Returns:
      tokens [B, N] int32 (PAD_ID past each row's length), lengths [B] int32, and
      `SpeculativeStats` (target steps, drafted and accepted tokens per row).
    Raises:
      ValueError: bad shapes or lengths (as `generate()`), num_draft_tokens < 1, an
        unknown drafter, or a draft model whose vocabulary differs from the target's.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    check_prompt(cfg, prompt_tokens, prompt_lengths, max_new_tokens)
    if num_draft_tokens < 1:
        raise ValueError(f"{num_draft_tokens=} must be >= 1")
    draft_cfg = check_draft(cfg, draft)
    if draft_cfg is not None:
        check_prompt(draft_cfg, prompt_tokens, prompt_lengths, max_new_tokens)
    sampling = SamplingParams(temperature, top_k, top_p)
    eos = tuple(cfg.eos_token_ids if eos_ids is None else (int(e) for e in eos_ids))
    state = run(
        params, cfg, None if draft_cfg is None else draft[0], draft_cfg, prompt_tokens, prompt_lengths, key,
        num_draft_tokens=num_draft_tokens, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos,
        kv_format=kv_format, attention_impl=attention_impl, adaptive_gamma=adaptive_gamma, rule=_acceptance,
    )
    return output_tokens(state, max_new_tokens), state.num_tokens, state.stats
