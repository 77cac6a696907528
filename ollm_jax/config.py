"""Model configuration: a frozen, hashable dataclass built from a Hugging Face `config.json`.

One `ModelConfig` describes every supported member of the Llama family. Variants are
fields, not separate model files:

| family        | what differs                                        |
| ------------- | --------------------------------------------------- |
| llama (2/3.x) | `rope_scaling` of type "llama3" (3.1/3.2), GQA       |
| mistral       | `sliding_window`                                    |
| qwen2 / 2.5   | bias on the q/k/v projections                       |
| qwen3         | RMSNorm on q and k per head (`qk_norm`)             |
| SmolLM2       | plain llama with tied embeddings                    |

The config is hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedConfigError(ValueError):
    """A config.json asks for something this engine does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` "llama3" or "linear")."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"  # dtype of parameters and activations

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (the GQA group size G)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, dtype: str | None = None) -> "ModelConfig":
        """Builds a config from the dict of a Hugging Face `config.json`.

        Raises:
          UnsupportedConfigError: naming the `model_type` or option that is not supported.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"unsupported model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
        if act != "silu":
            raise UnsupportedConfigError(f"unsupported hidden_act={act!r} (only 'silu')")
        if hf.get("mlp_bias", False):
            raise UnsupportedConfigError("unsupported option mlp_bias=True")
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
            raise UnsupportedConfigError(
                f"unsupported option use_sliding_window=True for model_type={model_type!r}"
            )

        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        rope_theta, rope_scaling = _rope_from_hf(hf)

        attention_bias = bool(hf.get("attention_bias", False))
        if model_type == "qwen2":  # Qwen2 always has q/k/v bias and never an o bias.
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        sliding_window = hf.get("sliding_window") if model_type == "mistral" else None

        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype or "bfloat16",
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, dtype: str | None = None) -> "ModelConfig":
        """Reads `config.json` (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_hf(json.load(f), dtype=dtype)


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads RoPE settings in both the transformers 4 (`rope_theta` + `rope_scaling`)
    and transformers 5 (`rope_parameters`) layouts."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )
