"""Fused quantize-and-append kernel: bit-exact against `kv_cache.write(impl="xla")` in
interpret mode on the CPU and compiled on a GPU (one store, and K and V in one launch),
argument errors, the rounding trick and the exact fp16 reciprocal (the kernel's
`rcp.rn.f32` against it on a GPU), and deviceless lowering of the shipped configurations
to Triton."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from ollm_jax import kv_cache
from pallas_kernels import quantize_append as qa
from pallas_kernels import on_gpu
from tests.lowering import assert_lowers_to_triton

INTERPRET = not on_gpu()  # the same checks run the compiled kernel on a GPU


def _store(kind: str, shape, group: int, seed: int):
    """A store of `kind` ([B, S, K, D] values) filled with random garbage, so that slots
    the kernel must leave alone are distinguishable from zeros."""
    empty = kv_cache.empty_store(kind, shape, min(group, shape[-1]))
    rng = np.random.default_rng(seed)

    def fill(a):
        if jnp.issubdtype(a.dtype, jnp.integer):
            info = jnp.iinfo(a.dtype)
            return jnp.asarray(rng.integers(info.min, info.max, a.shape, endpoint=True), a.dtype)
        return jnp.asarray(rng.standard_normal(a.shape), a.dtype)

    return jax.tree.map(fill, empty)


def _assert_same(got, want):
    assert type(got) is type(want)
    for name, g, w in zip(("data", "scale", "zero"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        g, w = np.asarray(g), np.asarray(w)
        # Compare bits (NaN-safe, and -0.0 != 0.0 counts).
        gb, wb = g.view(np.uint8), w.view(np.uint8)
        bad = np.flatnonzero((gb != wb).reshape(g.size, -1).any(axis=1))
        assert bad.size == 0, (
            f"{name}: {bad.size} of {g.size} elements differ, first at "
            f"{np.unravel_index(bad[0], g.shape)}: kernel {g.flat[bad[0]]} vs write {w.flat[bad[0]]}")


def _values(seed, b, t, k, d, x_dtype):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 4.0, (b, t, k, 1))  # rows of different magnitudes
    return jnp.asarray(rng.standard_normal((b, t, k, d)) * scale + rng.normal(0, 0.5, (b, t, k, 1)), x_dtype)


def _check(kind, group, b, t, k, d, s, start, count, *, block_t=None, heads=None, x_dtype=jnp.bfloat16, x=None):
    seed = zlib.crc32(repr((kind, group, b, t, k, d, s, start, count, block_t, str(x_dtype))).encode())
    if x is None:
        x = _values(seed, b, t, k, d, x_dtype)
    start, count = jnp.asarray(start, jnp.int32), jnp.asarray(count, jnp.int32)
    # The reference under jit, as models run it (XLA may fuse across the encode there).
    want = jax.jit(qa.quantize_append_reference)(_store(kind, (b, s, k, d), group, seed), x, start, count)
    got = qa.quantize_append(_store(kind, (b, s, k, d), group, seed), x, start, count, block_t=block_t,
                             heads=heads, interpret=INTERPRET)
    _assert_same(got, want)


# kind, group, (B, T, K, D, S), start, count, block_t. T is never a multiple of block_t;
# every case has a ragged batch, most have a row with count 0, an offset start and a
# write running past S (dropped).
CASES = [
    ("int8", 0, (3, 37, 3, 64, 50), [0, 20, 5], [37, 0, 30], 16),  # row 1: 20 + 30 > 50
    ("int8", 0, (2, 21, 2, 128, 40), [30, 3], [21, 0], 8),  # row 0: 30 + 21 > 40
    ("int8", 0, (2, 1, 4, 128, 16), [15, 7], [1, 0], None),  # decode: T = 1, block_t = 1
    ("int4", 32, (2, 37, 3, 128, 50), [3, 30], [0, 37], 16),
    ("int4", 64, (2, 29, 2, 128, 40), [11, 0], [29, 13], 8),
    ("int4", 128, (2, 29, 2, 128, 40), [11, 45], [29, 20], 16),  # row 1 starts past S
    ("int4", 32, (2, 19, 4, 64, 24), [0, 9], [19, 19], 8),
    ("int4", 64, (2, 19, 1, 64, 24), [6, 2], [0, 19], 16),  # group == D: one group, both halves
    ("bf16", 0, (2, 37, 3, 128, 50), [0, 30], [37, 25], 16),
    ("bf16", 0, (2, 13, 2, 64, 20), [2, 10], [0, 13], None),
]


@pytest.mark.parametrize(("kind", "group", "shape", "start", "count", "block_t"), CASES,
                         ids=[f"{c[0]}-g{c[1]}-{'x'.join(map(str, c[2]))}" for c in CASES])
def test_matches_write_bit_for_bit(kind, group, shape, start, count, block_t):
    _check(kind, group, *shape, start, count, block_t=block_t)


# Heads per program other than the default (all of K's power-of-2 part).
@pytest.mark.parametrize(("kind", "group", "shape", "heads", "block_t"), [
    ("int8", 0, (2, 19, 8, 64, 24), 2, 8),
    ("int4", 32, (2, 19, 4, 128, 24), 1, 16),
    ("int4", 128, (1, 9, 8, 128, 16), 4, 4),
], ids=["int8-heads2", "int4-g32-heads1", "int4-g128-heads4"])
def test_heads_per_program(kind, group, shape, heads, block_t):
    _check(kind, group, *shape, [3, 0][:shape[0]], [shape[1], 11][:shape[0]], block_t=block_t, heads=heads)


# K and V in one launch: (k kind, v kind), int4 group, (B, T, K, D, S), start, count, block_t, heads.
KV_CASES = [
    (("int8", "int4"), 64, (3, 37, 2, 128, 50), [0, 20, 5], [37, 0, 30], 16, None),
    (("int4", "int8"), 32, (2, 19, 4, 64, 24), [0, 9], [19, 19], 8, 2),
    (("bf16", "int4"), 128, (2, 13, 2, 128, 20), [2, 10], [0, 13], None, None),
    (("int8", "int8"), 0, (2, 21, 8, 64, 40), [30, 3], [21, 0], 4, None),
]


@pytest.mark.parametrize(("kinds", "group", "shape", "start", "count", "block_t", "heads"), KV_CASES,
                         ids=[f"{c[0][0]}-{c[0][1]}-g{c[1]}-{'x'.join(map(str, c[2]))}" for c in KV_CASES])
def test_kv_in_one_launch_matches_write(kinds, group, shape, start, count, block_t, heads):
    b, t, k, d, s = shape
    seed = zlib.crc32(repr((kinds, group, shape)).encode())
    kx, vx = _values(seed, b, t, k, d, jnp.bfloat16), _values(seed + 1, b, t, k, d, jnp.bfloat16)
    start, count = jnp.asarray(start, jnp.int32), jnp.asarray(count, jnp.int32)

    def stores():
        return [_store(kind, (b, s, k, d), group or 64, seed + j) for j, kind in enumerate(kinds)]

    want = jax.jit(qa.quantize_append_kv_reference)(*stores(), kx, vx, start, count)
    got = qa.quantize_append_kv(*stores(), kx, vx, start, count, block_t=block_t, heads=heads, interpret=INTERPRET)
    for g, w in zip(got, want):
        _assert_same(g, w)


@pytest.mark.parametrize("kv_format", ["k8v4-g32", "kivi4-g32"])
def test_write_dispatches_to_the_kernel(kv_format):
    """`write(impl="pallas")` (one launch for K and V; per store beside a kivi4 side)
    equals `write(impl="xla")`."""
    fmt = kv_cache.parse_format(kv_format)
    b, t, k, d, s = 2, 11, 2, 64, 32
    layer = kv_cache.LayerCache(*(kv_cache.empty_store(kind, (b, s, k, d), fmt.group) for kind in (fmt.k, fmt.v)))
    kx, vx = _values(1, b, t, k, d, jnp.bfloat16), _values(2, b, t, k, d, jnp.bfloat16)
    pos = jnp.arange(t, dtype=jnp.int32)[None, :] + jnp.array([[0], [5]], jnp.int32)
    positions = jnp.where(jnp.arange(t)[None, :] < jnp.array([[t], [7]]), pos, -1)
    write = jax.jit(kv_cache.write, static_argnames="impl")
    got, want = write(layer, kx, vx, positions, impl="pallas"), write(layer, kx, vx, positions, impl="xla")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))


@pytest.mark.parametrize(("kind", "x_dtype"), [("fp16", jnp.bfloat16), ("bf16", jnp.float16), ("int8", jnp.float16)])
def test_dtype_casts(kind, x_dtype):
    _check(kind, 64, 2, 9, 2, 64, 16, [0, 4], [9, 7], block_t=4, x_dtype=x_dtype)


@pytest.mark.parametrize(("kind", "group"), [("int8", 0), ("int4", 32), ("int4", 128)])
def test_degenerate_rows(kind, group):
    """Zero rows (scale 0: divide by 1), constant rows and groups (int4 scale 0), values
    on exact half steps (ties round to even), large and tiny magnitudes."""
    b, t, k, d = 1, 8, 2, 128
    rows = [
        np.zeros(d),
        np.full(d, 3.0),
        np.tile([0.0, 0.0, 0.0, 5.0], d // 4),  # constant groups beside varied ones
        (np.arange(d) - d / 2) * 0.5,  # many x / scale values near halves
        np.linspace(-127, 127, d),  # absmax 127: scale 1, exact halves at +-0.5
        np.linspace(-1000, 3000, d),
        np.linspace(-1e-4, 1e-4, d),  # scales in fp16's subnormal range
        np.r_[np.full(d // 2, -2.0), np.full(d // 2, 7.0)],
    ]
    x = np.stack(rows)[None, :, None, :].repeat(k, axis=2)  # [B, T, K, D]
    x[..., 1, :] *= -1.5  # second head differs
    x = jnp.asarray(x, jnp.bfloat16)
    _check(kind, group, b, t, k, d, 12, [3], [t], block_t=4, x=x)


def test_rounding_trick_is_half_even():
    """The kernel rounds by adding 1.5 * 2^23 (Triton lowers no `round`)."""
    y = np.concatenate([np.arange(-300, 300) * 0.5, np.linspace(-200, 200, 10001), [-0.0, 1e-30, -1e-30]])
    y = y.astype(np.float32)
    got = np.asarray(jax.jit(lambda v: qa._rint(v))(y))
    np.testing.assert_array_equal(got, np.round(y).astype(np.int32))


def test_reciprocal_fp16_is_exact():
    """`kv_cache.reciprocal_fp16` (integer operations only, so every backend agrees) is
    IEEE 1 / scale for every fp16 scale >= 0, with 0 -> 1 and inf -> 0."""
    s = np.arange(0, 0x7C01, dtype=np.uint16).view(np.float16)  # +0, subnormals, normals, +inf
    got = np.asarray(jax.jit(kv_cache.reciprocal_fp16)(jnp.asarray(s)))
    with np.errstate(divide="ignore"):
        want = np.float32(1) / np.where(s == 0, np.float16(1), s).astype(np.float32)
    want[np.isinf(s)] = 0
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def _reciprocal_kernel(s_ref, o_ref):
    o_ref[...] = qa._reciprocal(s_ref[...], interpret=False)


def _reciprocal_call(s):
    return pl.pallas_call(_reciprocal_kernel, out_shape=jax.ShapeDtypeStruct(s.shape, jnp.float32))(s)


def test_kernel_reciprocal_equals_reciprocal_fp16():
    """On the GPU the kernel takes 1 / scale from one `rcp.rn.f32`: the same bits as
    `reciprocal_fp16` for every fp16 scale >= 0 (0 -> 1, inf -> 0). On the CPU, its
    deviceless lowering."""
    s = np.arange(0, 0x8000, dtype=np.uint16).view(np.float16)  # +0 .. +inf, NaNs left out below
    s = jnp.asarray(np.where(np.isnan(s), np.float16(1), s).reshape(256, 128))
    if INTERPRET:
        assert_lowers_to_triton(_reciprocal_call, jax.ShapeDtypeStruct(s.shape, jnp.float16))
        return
    got = np.asarray(jax.jit(_reciprocal_call)(s))
    want = np.asarray(jax.jit(kv_cache.reciprocal_fp16)(s))
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_argument_errors():
    store = _store("int8", (2, 8, 2, 64), 0, 0)
    x = jnp.zeros((2, 4, 2, 64), jnp.bfloat16)
    z = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="does not match"):
        qa.quantize_append(store, jnp.zeros((2, 4, 3, 64), jnp.bfloat16), z, z, interpret=True)
    with pytest.raises(ValueError, match=r"start and count must be \[B\]"):
        qa.quantize_append(store, x, jnp.zeros((3,), jnp.int32), z, interpret=True)
    with pytest.raises(ValueError, match="block_t=24"):
        qa.quantize_append(store, x, z, z, block_t=24, interpret=True)
    with pytest.raises(ValueError, match="head_dim d=48"):
        qa.quantize_append(_store("int8", (2, 8, 2, 48), 0, 0), x[..., :48], z, z, interpret=True)
    with pytest.raises(TypeError, match="not LayerCache"):
        qa.quantize_append(kv_cache.LayerCache(store, store), x, z, z, interpret=True)
    with pytest.raises(ValueError, match="heads=3 must be a power of 2 dividing"):
        qa.quantize_append(_store("int8", (2, 8, 2, 64), 0, 0), x, z, z, heads=3, interpret=True)
    with pytest.raises(ValueError, match="heads=4 must be a power of 2 dividing"):
        qa.quantize_append(_store("int8", (2, 8, 2, 64), 0, 0), x, z, z, heads=4, interpret=True)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        qa.quantize_append_kv(_store("int8", (2, 8, 2, 64), 0, 0), _store("int8", (2, 8, 2, 64), 0, 0),
                              x, x[:, :2], z, z, interpret=True)


# Shipped configurations: default knobs at the shapes the engine and the benchmark use.
LOWERING = [
    (kind, group, shape)
    for kind, group in [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("bf16", 0)]
    for shape in [(1, 16384, 8, 128, 32768), (2, 2048, 32, 64, 4096), (4, 1, 8, 128, 4096), (2, 7, 3, 64, 256)]
]


@pytest.mark.parametrize(("kind", "group", "shape"), LOWERING,
                         ids=[f"{c[0]}-g{c[1]}-{'x'.join(map(str, c[2]))}" for c in LOWERING])
def test_lowers_to_triton(kind, group, shape):
    _assert_lowers((kind,), group, shape)


# K and V in one launch, as `kv_cache.write` calls it for each kv_format (int4 groups: 64).
LOWERING_KV = [
    (kinds, shape)
    for kinds in [("int8", "int8"), ("int4", "int4"), ("int8", "int4"), ("int4", "int8"), ("bf16", "bf16")]
    for shape in [(1, 16384, 8, 128, 32768), (2, 2048, 32, 64, 4096), (4, 1, 8, 128, 4096), (2, 7, 3, 64, 256)]
]


@pytest.mark.parametrize(("kinds", "shape"), LOWERING_KV,
                         ids=[f"{c[0][0]}-{c[0][1]}-{'x'.join(map(str, c[1]))}" for c in LOWERING_KV])
def test_kv_lowers_to_triton(kinds, shape):
    _assert_lowers(kinds, 64, shape)


def _assert_lowers(kinds, group, shape):
    """The default configuration of one store's (or, for two kinds, K and V's) append."""
    b, t, k, d, s = shape
    stores = [jax.eval_shape(lambda kind=kind: kv_cache.empty_store(kind, (b, s, k, d), min(group or 64, d)))
              for kind in kinds]
    flat = [jax.tree.flatten(store) for store in stores]

    def fn(start, count, *args):
        xs, leaves = args[:len(kinds)], list(args[len(kinds):])
        sts = []
        for lv, tree in flat:
            sts.append(jax.tree.unflatten(tree, leaves[:len(lv)]))
            leaves = leaves[len(lv):]
        if len(kinds) == 1:
            return qa.quantize_append(sts[0], xs[0], start, count)
        return qa.quantize_append_kv(*sts, *xs, start, count)

    ints = jax.ShapeDtypeStruct((b,), jnp.int32)
    xs = [jax.ShapeDtypeStruct((b, t, k, d), jnp.bfloat16)] * len(kinds)
    assert_lowers_to_triton(fn, ints, ints, *xs, *(a for lv, _ in flat for a in lv))
