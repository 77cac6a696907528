"""Pallas GPU kernels (Triton lowering) with their plain-JAX reference twins.

Each kernel file holds the kernel body, a jitted wrapper whose tuning knobs are
keyword-only static arguments, a `*_reference` function with the exact semantics, and a
`__main__` that sweeps sizes on the GPU and prints % of the hardware limit. Each kernel
has one dispatch point that falls back to its reference on the CPU: `ollm_jax.attention`
(flash_decode, flash_prefill through `ollm_jax.router`), `ollm_jax.kv_cache`
(quantize_append), `ollm_jax.model._fused_projection` (norm_qkv, on request only) and
`ollm_jax.model._int8_kernel` (gemv_int8, for int8 weight-only matrices).

The Triton backend of Pallas is deprecated since jax 0.11.0 (not removed in 0.12) and
warns on every lowering. This is the one place that warning is filtered.
"""

from __future__ import annotations

import warnings

import jax

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)


def on_gpu() -> bool:
    """True when the default backend is a CUDA GPU (where the Triton lowering runs)."""
    return jax.default_backend() == "gpu"
