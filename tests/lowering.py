"""Deviceless lowering: checks on the CPU that a kernel configuration lowers to Triton.

This does not compile PTX (only the GPU machine does that); it catches what the
Triton lowering rejects (block shapes, dtypes, unsupported ops) in CI.
"""

from __future__ import annotations

import jax
from jax._src import mesh as mesh_lib  # private API, as jax's own triton_pallas_test uses it

TRITON_TARGET = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args) -> str:
    """Lowers `fn(*args)` (args: arrays or ShapeDtypeStructs) for CUDA; returns the text."""
    dev = mesh_lib.AbstractDevice("NVIDIA H100", 1, "cuda")
    amesh = mesh_lib.AbstractMesh((1,), ("x",), (mesh_lib.AxisType.Explicit,), abstract_device=dev)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with jax.sharding.use_abstract_mesh(amesh):
        lowered = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def assert_lowers_to_triton(fn, *args) -> None:
    text = lower_for_cuda(fn, *args)
    assert TRITON_TARGET in text, "kernel did not lower to a Triton custom call"
