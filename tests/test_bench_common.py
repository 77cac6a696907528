"""The benchmarks' shared timing helpers (bench/common.py) that need no GPU to check."""

from __future__ import annotations

import jax.numpy as jnp

from bench.common import busy_ns, device_busy_seconds


def test_busy_ns_counts_overlapping_kernels_once():
    assert busy_ns([]) == 0
    # [0, 15) from two overlapping spans, [20, 30) holding a nested one, [30, 31) touching it.
    assert busy_ns([(20, 30), (0, 10), (21, 22), (5, 15), (30, 31)]) == 15 + 10 + 1


def test_device_busy_seconds_is_none_off_the_gpu():
    assert device_busy_seconds(lambda: jnp.ones(3) + 1) is None
