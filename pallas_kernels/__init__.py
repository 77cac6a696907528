"""Pallas GPU kernels (Triton lowering) with their plain-JAX reference twins.

Each kernel file holds the kernel body, a jitted wrapper whose tuning knobs are
keyword-only static arguments, a `*_reference` function with the exact semantics, and a
`__main__` that sweeps sizes on the GPU and prints % of the hardware limit. Model code
never calls a kernel directly: `ollm_jax.attention` and `ollm_jax.kv_cache` are the
dispatch points, and fall back to the references on the CPU.

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
