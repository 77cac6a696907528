"""Layer-exact parity with Hugging Face on tiny random models, one per variant.

The fixtures under tests/fixtures/hf_tiny/ come from `tests/fixtures/make_hf_reference.py`
(transformers + torch, float32, eager attention). Each holds a random-init model and
HF's logits for a 12-token prefill of two sequences and for 6 single-token decode steps
through HF's KV cache. Our `forward` runs the same float32 weights here.

Error measure: rel_err(ours, ref) = max|ours - ref| / max|ref| over the whole logits
array; it must be <= 1e-4.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import convert, kv_cache
from ollm_jax.config import ModelConfig
from ollm_jax.model import forward, param_specs

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_tiny")
VARIANTS = ("llama_gqa", "llama_tied", "llama3_rope", "mistral_sliding", "qwen2_bias", "qwen3_qknorm")
TOL = 1e-4

_forward = jax.jit(forward, static_argnums=1)


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def load_hf_dir(src: str):
    """(params, cfg) for a Hugging Face directory in float32, via `ollm_jax.convert`."""
    params, hf_config = convert.load_hf_dir(src, dtype="float32", progress=False)
    cfg = ModelConfig.from_hf(hf_config, dtype="float32")
    # The loaded tree must match the model's declaration exactly (names, shapes, dtypes).
    specs = param_specs(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(specs), (
        jax.tree.structure(params), jax.tree.structure(specs))
    for (path, got), want in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(specs)):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), (jax.tree_util.keystr(path), got, want)
    return jax.device_put(params), cfg


@functools.lru_cache(maxsize=None)
def _variant(name: str):
    src = os.path.join(FIXTURES, name)
    params, cfg = load_hf_dir(src)
    ref = dict(np.load(os.path.join(src, "reference.npz")))
    return params, cfg, ref


def _positions(batch: int, start: int, length: int) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (batch, length))


EXPECTED_CONFIG = {
    # name: fields that must have been read from config.json
    "llama_gqa": dict(num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False, rope_scaling=None),
    "llama_tied": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(num_kv_heads=1, rope_theta=500000.0),
    "mistral_sliding": dict(sliding_window=8, num_kv_heads=2),
    "qwen2_bias": dict(qkv_bias=True, o_bias=False, head_dim=16, rope_theta=1e6, sliding_window=None),
    "qwen3_qknorm": dict(qk_norm=True, qkv_bias=False, num_heads=3, num_kv_heads=1, head_dim=32),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_config_parses(name):
    cfg = ModelConfig.from_file(os.path.join(FIXTURES, name), dtype="float32")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (128, 64, 80, 2)
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 256
    for field, value in EXPECTED_CONFIG[name].items():
        assert getattr(cfg, field) == value, (field, getattr(cfg, field), value)
    if name == "llama3_rope":
        rs = cfg.rope_scaling
        assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                rs.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 64)
    else:
        assert cfg.rope_scaling is None
    if name != "mistral_sliding":
        assert cfg.sliding_window is None


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_and_decode_match_hf(name):
    params, cfg, ref = _variant(name)
    tokens, decode_tokens = ref["tokens"], ref["decode_tokens"]
    (batch, t), n = tokens.shape, decode_tokens.shape[1]
    cache = kv_cache.create(cfg, batch, t + n)

    logits, cache = _forward(params, cfg, jnp.asarray(tokens), _positions(batch, 0, t), cache)
    err = rel_err(logits, ref["prefill_logits"])
    assert err <= TOL, f"{name} prefill {err=:.2e}"
    np.testing.assert_array_equal(np.asarray(cache.lengths), [t] * batch)

    steps = []
    for i in range(n):
        step, cache = _forward(params, cfg, jnp.asarray(decode_tokens[:, i : i + 1]),
                               _positions(batch, t + i, 1), cache)
        steps.append(step[:, 0])
    err = rel_err(jnp.stack(steps, 1), ref["decode_logits"])
    assert err <= TOL, f"{name} decode {err=:.2e}"
    np.testing.assert_array_equal(np.asarray(cache.lengths), [t + n] * batch)


@pytest.mark.parametrize("name", VARIANTS)
def test_chunked_prefill_equals_one_shot(name):
    params, cfg, ref = _variant(name)
    tokens = jnp.asarray(ref["tokens"])
    batch, t = tokens.shape
    split = 5
    one_shot, _ = _forward(params, cfg, tokens, _positions(batch, 0, t), kv_cache.create(cfg, batch, t))

    cache = kv_cache.create(cfg, batch, t)
    first, cache = _forward(params, cfg, tokens[:, :split], _positions(batch, 0, split), cache)
    rest, cache = _forward(params, cfg, tokens[:, split:], _positions(batch, split, t - split), cache)
    chunked = jnp.concatenate([first, rest], axis=1)
    assert rel_err(chunked, one_shot) <= 1e-5, name
    assert rel_err(chunked, ref["prefill_logits"]) <= TOL, name


@pytest.mark.parametrize("name", ("llama_gqa", "mistral_sliding"))
def test_right_padded_prompt_matches_hf_prefix(name):
    """A shorter row padded with position -1 gives the same logits on its valid tokens
    (causality: HF's logits of a prefix are those of the full prompt's first rows)."""
    params, cfg, ref = _variant(name)
    tokens = jnp.asarray(ref["tokens"])
    batch, t = tokens.shape
    valid = 7
    positions = _positions(batch, 0, t)
    positions = positions.at[1, valid:].set(-1)
    tokens = tokens.at[1, valid:].set(0)
    logits, cache = _forward(params, cfg, tokens, positions, kv_cache.create(cfg, batch, t + 1))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [t, valid])
    assert rel_err(logits[0], ref["prefill_logits"][0]) <= TOL
    assert rel_err(logits[1, :valid], ref["prefill_logits"][1, :valid]) <= TOL


def test_max_rel_errors_summary(capsys):
    """Prints the prefill/decode relative error per variant (informational; -s shows it)."""
    lines = []
    for name in VARIANTS:
        params, cfg, ref = _variant(name)
        tokens = jnp.asarray(ref["tokens"])
        batch, t = tokens.shape
        n = ref["decode_tokens"].shape[1]
        cache = kv_cache.create(cfg, batch, t + n)
        logits, cache = _forward(params, cfg, tokens, _positions(batch, 0, t), cache)
        steps = []
        for i in range(n):
            step, cache = _forward(params, cfg, jnp.asarray(ref["decode_tokens"][:, i : i + 1]),
                                   _positions(batch, t + i, 1), cache)
            steps.append(step[:, 0])
        lines.append(f"{name:16s} prefill {rel_err(logits, ref['prefill_logits']):.2e} "
                     f"decode {rel_err(jnp.stack(steps, 1), ref['decode_logits']):.2e}")
    with capsys.disabled():
        print("\nrel_err = max|ours-hf| / max|hf|\n" + "\n".join(lines))
