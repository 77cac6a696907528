"""generate(): batching, EOS, sampling reproducibility, jit, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import generate
from ollm_jax.generation import PAD_ID
from ollm_jax.sampling import SamplingParams, processed_logits
from tests.conftest import batch_prompts

PROMPTS = [[1, 5, 9, 23, 40, 7, 3], [1, 60], [1, 11, 12, 13, 14]]


def test_batch_equals_each_prompt_alone(tiny):
    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS)
    out, n = generate(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=12, eos_ids=())
    assert n.tolist() == [12, 12, 12]
    assert len({tuple(r) for r in out.tolist()}) == 3, "rows should differ for different prompts"
    for i, p in enumerate(PROMPTS):
        alone, _ = generate(params, cfg, jnp.asarray([p]), jnp.asarray([len(p)]), jax.random.key(0),
                            max_new_tokens=12, eos_ids=())
        np.testing.assert_array_equal(out[i], alone[0])


def test_eos_stops_a_row(tiny):
    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS)
    free, _ = generate(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=12, eos_ids=())
    eos = int(free[0, 4])
    stop = free[0].tolist().index(eos) + 1  # the EOS is kept
    out, n = generate(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=12, eos_ids=[eos])
    assert int(n[0]) == stop
    np.testing.assert_array_equal(out[0, :stop], free[0, :stop])
    assert (out[0, stop:] == PAD_ID).all()
    for i in (1, 2):  # other rows run on until their own EOS or the limit
        row = free[i].tolist()
        expect = row.index(eos) + 1 if eos in row else 12
        assert int(n[i]) == expect
        np.testing.assert_array_equal(out[i, :expect], free[i, :expect])


def test_all_rows_stopping_ends_the_loop_early(tiny):
    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS[:1])
    free, _ = generate(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=8, eos_ids=())
    out, n = generate(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=8,
                      eos_ids=[int(free[0, 0])])
    assert n.tolist() == [1] and (out[0, 1:] == PAD_ID).all()


def test_fixed_key_reproduces_sampling(tiny):
    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS)
    kw = dict(max_new_tokens=16, temperature=1.0, eos_ids=())
    a, _ = generate(params, cfg, tokens, lengths, jax.random.key(7), **kw)
    b, _ = generate(params, cfg, tokens, lengths, jax.random.key(7), **kw)
    c, _ = generate(params, cfg, tokens, lengths, jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_filters_equal_greedy(tiny, filters):
    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS)
    greedy, _ = generate(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=10, eos_ids=())
    sampled, _ = generate(params, cfg, tokens, lengths, jax.random.key(3), max_new_tokens=10,
                          temperature=1.5, eos_ids=(), **filters)
    np.testing.assert_array_equal(sampled, greedy)


def test_under_jit_equals_direct_call(tiny):
    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS)
    kw = dict(max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, eos_ids=(2,))
    direct = generate(params, cfg, tokens, lengths, jax.random.key(1), **kw)
    jitted = jax.jit(generate, static_argnames=("cfg", *kw))(params, cfg, tokens, lengths, jax.random.key(1), **kw)
    for a, b in zip(direct, jitted):
        np.testing.assert_array_equal(a, b)


def test_processed_logits_against_numpy():
    logits = jax.random.normal(jax.random.key(0), (3, 50)) * 3
    out = np.asarray(processed_logits(logits, SamplingParams(temperature=0.7, top_k=10, top_p=0.8)))
    for row, got in zip(np.asarray(logits, np.float64) / 0.7, out):
        order = np.argsort(-row)
        keep = order[:10]
        p = np.exp(row[keep] - row[keep].max())
        p /= p.sum()
        before = np.cumsum(p) - p
        keep = keep[before < 0.8]
        assert set(np.flatnonzero(np.isfinite(got))) == set(keep)
        np.testing.assert_allclose(got[keep], row[keep], rtol=1e-5)


def test_over_long_prompt_is_refused(tiny):
    cfg, params = tiny
    tokens = jnp.ones((1, 100), jnp.int32)
    with pytest.raises(ValueError, match=r"100 \+ max_new_tokens=29 = 129 exceeds .*max_position_embeddings=128"):
        generate(params, cfg, tokens, jnp.array([100]), jax.random.key(0), max_new_tokens=29)


@pytest.mark.parametrize(
    "tokens, lengths, match",
    [
        (np.ones((4,), np.int32), [4], r"prompt_tokens must be \[B, T\]"),
        (np.ones((2, 4), np.int32), [4], r"prompt_lengths must be \[B\]=2"),
        (np.ones((2, 4), np.int32), [4, 0], r"prompt_lengths=\[4, 0\] must lie in \[1, 4\]"),
        (np.ones((1, 4), np.int32), [5], r"prompt_lengths=\[5\] must lie in \[1, 4\]"),
    ],
)
def test_bad_prompts_are_refused(tiny, tokens, lengths, match):
    cfg, params = tiny
    with pytest.raises(ValueError, match=match):
        generate(params, cfg, tokens, np.asarray(lengths, np.int32), jax.random.key(0), max_new_tokens=4)


def test_bad_sampling_values_are_refused(tiny):
    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS)
    for kw, match in [(dict(temperature=-1.0), "temperature=-1.0"), (dict(top_p=0.0), "top_p=0.0"),
                      (dict(top_k=-2), "top_k=-2"), (dict(max_new_tokens=0), "max_new_tokens=0")]:
        with pytest.raises(ValueError, match=match):
            generate(params, cfg, tokens, lengths, jax.random.key(0), **{"max_new_tokens": 4, **kw})


def test_attention_pattern_window_equals_the_config_window(tiny):
    """generate(attention_pattern=SlidingWindow(w)) runs the router's pattern path in
    prefill and decode; a config with sliding_window=w runs the reference's window."""
    import dataclasses

    from ollm_jax.patterns import DenseCausal, SlidingWindow, Strided

    cfg, params = tiny
    tokens, lengths = batch_prompts(PROMPTS)
    key = jax.random.key(0)
    windowed, _ = generate(params, dataclasses.replace(cfg, sliding_window=3), tokens, lengths, key,
                           max_new_tokens=8, eos_ids=(), attention_impl="xla")
    patterned, _ = generate(params, cfg, tokens, lengths, key, max_new_tokens=8, eos_ids=(),
                            attention_pattern=SlidingWindow(3))
    np.testing.assert_array_equal(patterned, windowed)
    dense, _ = generate(params, cfg, tokens, lengths, key, max_new_tokens=8, eos_ids=(), attention_impl="xla")
    np.testing.assert_array_equal(
        generate(params, cfg, tokens, lengths, key, max_new_tokens=8, eos_ids=(), attention_pattern=DenseCausal())[0],
        dense)
    assert not np.array_equal(patterned, dense), "a 3-token window should change some continuation"
    strided, n = generate(params, cfg, tokens, lengths, key, max_new_tokens=8, eos_ids=(),
                          attention_pattern=Strided(window=2, period=4, width=1))
    assert n.tolist() == [8, 8, 8] and strided.shape == (3, 8)
