"""The flash-prefill kernel itself (interpret mode on the CPU, compiled on a GPU): both
variants against the reference, the length/offset/tail logic, and deviceless lowering of
every shipped configuration to Triton."""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import patterns as P
from pallas_kernels import flash_prefill as fp
from pallas_kernels import on_gpu
from pallas_kernels import multiscale
from tests.lowering import assert_lowers_to_triton
from tests.test_patterns import _assert_close, dense_softmax

INTERPRET = not on_gpu()  # the same checks run the compiled kernel on a GPU


def _qkv(b, t, s, h, kh, d, seed, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    shapes = ((b, t, h, d), (b, s, kh, d), (b, s, kh, d))
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)


# (B, T, S, H, K, D, q_offset, lengths, window, block_q, block_k)
CONTIGUOUS = {
    "causal-gqa4-d64-tail": (2, 45, 45, 4, 1, 64, 0, (45, 30), None, 32, 16),
    "causal-gqa8-d128-chunk": (1, 40, 97, 8, 1, 128, 57, None, None, 16, 32),
    "window-mha-d64-offset-ragged": (2, 50, 140, 2, 2, 64, 90, (140, 101), 23, 32, 16),
    "window-gqa4-d128-wide": (1, 64, 64, 4, 1, 128, 0, None, 40, 16, 16),
}


@pytest.mark.parametrize("name", CONTIGUOUS)
def test_contiguous_variant(name):
    b, t, s, h, kh, d, off, lengths, window, bq, bk = CONTIGUOUS[name]
    q, k, v = _qkv(b, t, s, h, kh, d, seed=zlib.crc32(name.encode()))
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    out = fp.flash_prefill(q, k, v, lengths=lengths, q_offset=off, window=window, block_q=bq, block_k=bk,
                           interpret=INTERPRET)
    pat = P.DenseCausal() if window is None else P.SlidingWindow(window)
    ref, vis = dense_softmax(q, k, v, pat.token_mask(t, s, off), lengths)
    _assert_close(out, ref, vis)


def test_table_variant_equals_contiguous_and_per_sequence_offsets():
    """Dense causal through tables = the contiguous kernel; [B] offsets are per sequence."""
    q, k, v = _qkv(2, 48, 80, 4, 2, 64, seed=7)
    lengths = jnp.asarray([80, 60], jnp.int32)
    tables = P.DenseCausal().block_tables(48, 80, 16, 16, 32)
    via_tables = fp.flash_prefill(q, k, v, tables, lengths=lengths, interpret=INTERPRET)
    direct = fp.flash_prefill(q, k, v, lengths=lengths, q_offset=32, block_q=16, block_k=16, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(via_tables, np.float32), np.asarray(direct, np.float32), atol=1e-2)
    offsets = jnp.asarray([32, 5], jnp.int32)
    out = fp.flash_prefill(q, k, v, lengths=lengths, q_offset=offsets, block_q=16, block_k=16, interpret=INTERPRET)
    for i, off in enumerate((32, 5)):
        ref, vis = dense_softmax(q[i:i + 1], k[i:i + 1], v[i:i + 1], P.DenseCausal().token_mask(48, 80, off),
                                 lengths[i:i + 1])
        _assert_close(out[i:i + 1], ref, vis)


def test_fp16_and_key_bias():
    q, k, v = _qkv(1, 32, 48, 2, 1, 64, seed=3, dtype=jnp.float16)
    bias = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, 48), jnp.float32)
    tables = P.SlidingWindow(20).block_tables(32, 48, 16, 16, 16)
    out = fp.flash_prefill(q, k, v, tables, key_bias=bias, interpret=INTERPRET)
    ref = fp.flash_prefill_reference(q, k, v, P.SlidingWindow(20).token_mask(32, 48, 16), key_bias=bias)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=1e-2)


def test_rows_without_visible_keys_are_finite():
    q, k, v = _qkv(2, 32, 32, 2, 1, 64, seed=5)
    lengths = jnp.asarray([0, 32], jnp.int32)
    out = fp.flash_prefill(q, k, v, lengths=lengths, block_q=16, block_k=16, interpret=INTERPRET)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert not np.asarray(out[0], np.float32).any()  # length 0: no block visited, zeros


def test_table_counts_split_blocks_cut_by_length():
    tables = P.DenseCausal().block_tables(64, 64, 16, 16)
    counts = np.asarray(fp._table_counts(tables, jnp.asarray([64, 40, 0], jnp.int32)))  # [B, 1, nq, 4]
    # Last query block (full blocks 0..2, diagonal partial 3): length 40 cuts block 2.
    assert counts[0, 0, 3, :3].tolist() == [3, 3, 1]
    assert counts[1, 0, 3, :3].tolist() == [2, 3, 0]
    assert counts[2, 0, 3, :3].tolist() == [0, 0, 0]


def test_bad_inputs_name_the_values():
    q, k, v = _qkv(1, 16, 16, 2, 1, 48, seed=1)
    with pytest.raises(ValueError, match="head_dim=48"):
        fp.flash_prefill(q, k, v, interpret=INTERPRET)
    q, k, v = _qkv(1, 16, 16, 3, 2, 64, seed=1)
    with pytest.raises(ValueError, match="not a multiple"):
        fp.flash_prefill(q, k, v, interpret=INTERPRET)
    q, k, v = _qkv(1, 16, 16, 2, 1, 64, seed=1)
    with pytest.raises(ValueError, match="tables for T=32"):
        fp.flash_prefill(q, k, v, P.BigBird(8).block_tables(32, 16, 16, 16), interpret=INTERPRET)


def test_formula_masks_equal_tile_masks():
    """Table patterns with formula terms: the in-register masks give what the tiles give."""
    q, k, v = _qkv(1, 40, 100, 2, 1, 64, seed=11)
    lengths = jnp.asarray([93], jnp.int32)
    for pat in (P.Strided(window=20, period=24, width=8), P.Dilated(window=12, dilation=4)):
        tables = pat.block_tables(40, 100, 16, 16, 60)
        assert tables.formula == pat
        by_formula = fp.flash_prefill(q, k, v, tables, lengths=lengths, interpret=INTERPRET)
        by_tiles = fp.flash_prefill(q, k, v, dataclasses.replace(tables, formula=None), lengths=lengths,
                                    interpret=INTERPRET)
        np.testing.assert_allclose(np.asarray(by_formula, np.float32), np.asarray(by_tiles, np.float32), atol=1e-6)


def test_lazy_rescale_matches_reference():
    """Lazy rescaling (the max kept until it grows by 2**8) on large logits, where the
    running max moves often: contiguous window and formula-table kernels."""
    q, k, v = _qkv(1, 64, 160, 2, 1, 64, seed=13)
    q = q * 3  # logits of tens: many rescales, some skipped
    lengths = jnp.asarray([131], jnp.int32)
    kw = dict(lengths=lengths, lazy_rescale=True, interpret=INTERPRET)
    out = fp.flash_prefill(q, k, v, q_offset=96, window=40, block_q=32, block_k=16, **kw)
    ref, vis = dense_softmax(q, k, v, P.SlidingWindow(40).token_mask(64, 160, 96), lengths)
    _assert_close(out, ref, vis)
    pat = P.Strided(24, 32, 8)
    out = fp.flash_prefill(q, k, v, pat.block_tables(64, 160, 32, 16, 96), **kw)
    ref, vis = dense_softmax(q, k, v, pat.token_mask(64, 160, 96), lengths)
    _assert_close(out, ref, vis)


def test_host_counts_match_device_counts():
    """Without lengths the block counts are numpy constants; they equal the traced ones."""
    for pat, s in ((P.anchors_strided(), 1536), (P.BigBird(64, 16, 2, 64), 700)):
        tables = pat.block_tables(s, s, 128, 64)
        host = fp._table_counts(tables, None)
        device = np.asarray(fp._table_counts(tables, jnp.asarray([s], jnp.int32)))
        assert isinstance(host, np.ndarray) and host.shape == device.shape
        np.testing.assert_array_equal(host, device)


def test_default_configs_per_variant():
    for d in fp.HEAD_DIMS:
        configs = {v: fp.default_config(d, v) for v in fp.VARIANTS}
        assert fp.default_config(d) == configs["table"]  # what the router builds tables with
        for variant, (bq, bk, w, st) in configs.items():
            assert fp._warps_stages(d, variant, bq, bk) == (w, st)
            assert configs[variant] in [configs[variant]] + fp.TUNE_CONFIGS[d][variant]
    assert fp.default_config(128, "causal") == (128, 64, 4, 2)  # H200: 4.96 ms vs 5.18 for (128, 64, 8, 3)
    with pytest.raises(ValueError, match="variant"):
        fp.default_config(128, "dense")


# ----------------------------------------------------------------------------- deviceless lowering

SHIPPED = ["causal", "window", "table", "table-tiles", "table-per-head", "multiscale"]


def _lower(fn, head_dim, t=1000, s=1100, h=8, kh=2):
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    assert_lowers_to_triton(lambda q, k, v, n: fn(q, k, v, lengths=n), spec(1, t, h, head_dim),
                            spec(1, s, kh, head_dim), spec(1, s, kh, head_dim), lengths)


@pytest.mark.parametrize("head_dim", fp.HEAD_DIMS)
@pytest.mark.parametrize("variant", SHIPPED)
def test_lowers_to_triton(variant, head_dim):
    """Every shipped configuration (default tiles per head_dim and variant, fast exp2)
    lowers for CUDA on the CPU."""
    t, s, h = 1000, 1100, 8
    bq, bk, _, _ = fp.default_config(head_dim, "table")
    if variant == "causal":
        fn = functools.partial(fp.flash_prefill, q_offset=100)
    elif variant == "window":
        fn = functools.partial(fp.flash_prefill, window=4096, q_offset=100)
    elif variant == "table":  # formula masks
        fn = functools.partial(fp.flash_prefill, tables=P.anchors_strided().block_tables(t, s, bq, bk, 100))
    elif variant == "table-tiles":  # mask tiles
        fn = functools.partial(fp.flash_prefill, tables=P.BigBird(128, 64, 2, 64).block_tables(t, s, bq, bk, 100))
    elif variant == "table-per-head":
        pat = P.PerHead(tuple(P.BigBird(128, 64, 2, 64, seed=i) for i in range(h)))
        fn = functools.partial(fp.flash_prefill, tables=pat.block_tables(t, s, bq, bk, 100))
    else:
        fn = functools.partial(multiscale.multiscale_attention, pattern=P.MultiScale(256), q_offset=100)
    _lower(fn, head_dim, t, s, h)


@pytest.mark.parametrize("config", sorted({c for lst in fp.TUNE_CONFIGS[128].values() for c in lst}))
def test_tune_configs_lower(config):
    """The D=128 tune list (what the GPU sweep compiles) lowers, causal and windowed."""
    bq, bk, w, st = config
    knobs = dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
    _lower(functools.partial(fp.flash_prefill, window=1024, **knobs), 128)
    _lower(functools.partial(fp.flash_prefill, fast_exp=False, lazy_rescale=True, **knobs), 128)
