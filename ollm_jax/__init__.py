"""ollm-jax: a functional JAX inference engine for long-context LLMs on small GPUs."""

from ollm_jax.config import ModelConfig, UnsupportedConfigError
from ollm_jax.generation import generate
from ollm_jax.model import forward, init_params, param_specs
from ollm_jax.sampling import SamplingParams
from ollm_jax.speculative import speculative_generate

__all__ = [
    "ModelConfig",
    "SamplingParams",
    "UnsupportedConfigError",
    "forward",
    "generate",
    "init_params",
    "load",
    "param_specs",
    "speculative_generate",
]


def __getattr__(name):
    # `load` pulls in orbax and transformers; import them only when asked for.
    if name in ("load", "Model"):
        from ollm_jax import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'ollm_jax' has no attribute {name!r}")
