"""The benchmarks' helpers that need no GPU to check: bench/common.py's timing and trace
helpers, bench/decode_profile.py's report."""

from __future__ import annotations

import jax.numpy as jnp

from bench.common import (
    busy_ns,
    device_busy_seconds,
    device_kernel_events,
    kernel_table,
)


def test_busy_ns_counts_overlapping_kernels_once():
    assert busy_ns([]) == 0
    # [0, 15) from two overlapping spans, [20, 30) holding a nested one, [30, 31) touching it.
    assert busy_ns([(20, 30), (0, 10), (21, 22), (5, 15), (30, 31)]) == 15 + 10 + 1


def test_device_busy_seconds_is_none_off_the_gpu():
    assert device_busy_seconds(lambda: jnp.ones(3) + 1) is None


def test_device_kernel_events_is_none_off_the_gpu():
    assert device_kernel_events(lambda: jnp.ones(3) + 1) is None


def test_kernel_table_groups_by_name_per_unit():
    events = [("gemm", 0, 3000), ("norm", 3000, 1000), ("gemm", 5000, 5000), ("norm", 10000, 1000)]
    rows = kernel_table(events, per=2)  # two steps
    assert [r["kernel"] for r in rows] == ["gemm", "norm"]
    assert rows[0] == {"kernel": "gemm", "calls_per": 1.0, "us_per": 4.0, "us_per_call": 4.0}
    assert rows[1] == {"kernel": "norm", "calls_per": 1.0, "us_per": 1.0, "us_per_call": 1.0}


def test_decode_profile_report_groups_families():
    from bench.decode_profile import kernel_report, kind

    assert kind("loop_add_fusion.12") == "loop_add_fusion" and kind("gemm_fusion_dot.3.1") == "gemm_fusion_dot"
    events = [("loop_add_fusion.1", 0, 1000), ("loop_add_fusion.2", 2000, 1000), ("gemm_fusion_dot", 3000, 4000)]
    text, fields = kernel_report(events, steps=1, top=10)
    assert fields["kernels_per_step"] == 3 and fields["busy_us_per_step"] == 6.0
    assert [(f["kernel"], f["calls_per"]) for f in fields["families"]] == [("gemm_fusion_dot", 1), ("loop_add_fusion", 2)]
    assert "loop_add_fusion.2" in text and "by family" in text
