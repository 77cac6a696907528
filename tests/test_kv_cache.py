"""KV cache formats: quantization arithmetic, sizes, the write/read contract, KIVI flushing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import kv_cache, model
from ollm_jax.config import ModelConfig
from ollm_jax.generation import generate

LLAMA_8B_HEADS = dict(num_layers=32, num_kv_heads=8, head_dim=128)
SMOLLM2_HEADS = dict(num_layers=30, num_kv_heads=3, head_dim=64)


def _cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position_embeddings=256, dtype="float32")
    return ModelConfig(**{**base, **kw})


def test_int8_round_trip_error_is_half_a_step():
    x = jax.random.normal(jax.random.key(0), (3, 7, 2, 64), jnp.float32) * 3
    q, scale = kv_cache.quantize_int8(x)
    assert q.shape == (3, 7, 2, 16) and q.dtype == jnp.uint32
    assert scale.shape == (3, 7, 2) and scale.dtype == jnp.float16
    err = jnp.abs(kv_cache.dequantize_int8(q, scale, jnp.float32) - x)
    step = scale.astype(jnp.float32)[..., None]
    # Rounding to the nearest step of the fp16 scale; the absmax element may clip by <1 step
    # because the scale was rounded to fp16 (relative error 2^-11).
    assert bool(jnp.all(err <= 0.5 * step + 127 * step * 2.0**-11 + 1e-6))


def test_int8_words_hold_the_quarters_of_head_dim():
    """Byte c of word j is channel j + c * D/4, as two's complement int8 (against numpy)."""
    n = np.random.default_rng(0).integers(-128, 128, (2, 3, 16), dtype=np.int8)
    words = np.asarray(kv_cache.pack_int8(jnp.asarray(n)))  # [2, 3, 4]
    as_bytes = words.astype("<u4").view(np.uint8).reshape(2, 3, 4, 4)  # [..., word j, byte c]
    np.testing.assert_array_equal(as_bytes.transpose(0, 1, 3, 2).reshape(2, 3, 16).view(np.int8), n)
    np.testing.assert_array_equal(np.asarray(kv_cache.unpack_int8(jnp.asarray(words))), n)


@pytest.mark.parametrize("group", [8, 16, 32])
def test_int4_round_trip_and_packing(group):
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 32), jnp.float32)
    q, scale, zero = kv_cache.quantize_int4(x, group)
    assert q.shape == (2, 5, 3, 8) and q.dtype == jnp.uint16 and scale.shape == (2, 5, 3, 32 // group)
    nibbles = np.asarray(kv_cache.unpack_int4(q))
    assert nibbles.max() <= 15
    for e in range(4):  # nibble e of word j: channel j + e * D/4
        np.testing.assert_array_equal(nibbles[..., 8 * e:8 * (e + 1)], (np.asarray(q) >> (4 * e)) & 0xF)
    err = jnp.abs(kv_cache.dequantize_int4(q, scale, zero, jnp.float32) - x)
    step = jnp.repeat(scale.astype(jnp.float32), group, axis=-1)
    zero_err = jnp.repeat(jnp.abs(zero.astype(jnp.float32) - x.reshape(2, 5, 3, -1, group).min(-1)), group, -1)
    assert bool(jnp.all(err <= 0.5 * step + zero_err + 15 * step * 2.0**-11 + 1e-6))


@pytest.mark.parametrize(
    ("heads", "fmt", "bytes_per_layer"),
    [
        (LLAMA_8B_HEADS, "bf16", 2 * 8 * 128 * 2),
        (LLAMA_8B_HEADS, "int8", 2 * 8 * (128 + 2)),
        (LLAMA_8B_HEADS, "int4", 2 * 8 * (64 + 2 * 2 * 2)),
        (LLAMA_8B_HEADS, "int4-g128", 2 * 8 * (64 + 2 * 2)),
        (LLAMA_8B_HEADS, "k8v4", 8 * (128 + 2) + 8 * (64 + 8)),
        # kivi4 keys: a scale and zero per channel per 64 tokens; the bf16 residual group
        # is fixed per sequence, not per token.
        (LLAMA_8B_HEADS, "kivi4-g64", 8 * (64 + 2 * 2 * 128 / 64) + 8 * (64 + 2 * 2 * 2)),
        (SMOLLM2_HEADS, "kivi4-g128", 3 * (32 + 2 * 2 * 64 / 128) + 3 * (32 + 2 * 2 * 1)),
        (SMOLLM2_HEADS, "bf16", 2 * 3 * 64 * 2),
        (SMOLLM2_HEADS, "int8", 2 * 3 * (64 + 2)),
        (SMOLLM2_HEADS, "int4", 2 * 3 * (32 + 4)),
    ],
)
def test_bytes_per_token_counted_from_the_cache(heads, fmt, bytes_per_layer):
    cfg = _cfg(**heads, num_heads=heads["num_kv_heads"] * 4, dtype="bfloat16")
    assert kv_cache.bytes_per_token_per_layer(cfg, fmt) == bytes_per_layer
    assert kv_cache.bytes_per_token(cfg, fmt) == heads["num_layers"] * bytes_per_layer


@pytest.mark.parametrize("heads", [LLAMA_8B_HEADS, SMOLLM2_HEADS])
def test_compression_targets(heads):
    cfg = _cfg(**heads, num_heads=heads["num_kv_heads"] * 4, dtype="bfloat16")
    bf16 = kv_cache.bytes_per_token(cfg, "bf16")
    assert bf16 / kv_cache.bytes_per_token(cfg, "int8") >= 1.9
    assert bf16 / kv_cache.bytes_per_token(cfg, "int4") >= 3.5


@pytest.mark.parametrize("bad", ["int3", "bf16-g32", "int4-g48", "", "INT8"])
def test_bad_format_names_the_value(bad):
    with pytest.raises(ValueError, match="kv_format"):
        kv_cache.parse_format(bad)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "k8v4", "k4v8", "kivi4-g32", "bf16"])
def test_write_read_matches_quantized_values(fmt):
    """read() returns exactly the dequantized values of what was written, at its positions."""
    cfg = _cfg(dtype="bfloat16")
    cache = kv_cache.create(cfg, batch=2, max_len=40, kv_format=fmt)
    k = jax.random.normal(jax.random.key(2), (2, 40, 2, 16), jnp.float32)
    v = jax.random.normal(jax.random.key(3), (2, 40, 2, 16), jnp.float32)
    lengths = jnp.array([40, 23])
    positions = jnp.where(jnp.arange(40)[None] < lengths[:, None], jnp.arange(40)[None], -1)
    layer = kv_cache.write(cache.layers[0], k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), positions)
    k_read, v_read = kv_cache.read(layer, jnp.float32)
    for got, want, side in ((k_read, k, "k"), (v_read, v, "v")):
        kind = getattr(kv_cache.parse_format(fmt), side)
        tol = {"bf16": 0.02, "int8": 0.03, "int4": 0.45, "kivi4": 0.45}[kind]
        for row, n in enumerate(lengths.tolist()):
            np.testing.assert_allclose(np.asarray(got[row, :n]), np.asarray(want[row, :n]), atol=tol)


def test_kivi_flushes_whole_groups_and_keeps_the_rest_exact():
    g = 8
    store = kv_cache.empty_store("kivi4", (2, 32, 2, 16), g, jnp.float32)
    x = jax.random.normal(jax.random.key(4), (2, 27, 2, 16), jnp.float32)
    lengths = jnp.array([27, 13])

    def positions(t0, t1):
        t = jnp.arange(t0, t1)[None]
        return jnp.where(t < lengths[:, None], t, -1)

    one_shot = kv_cache._kivi_write(store, x, positions(0, 27))
    chunked = store
    for t0, t1 in [(0, 5), (5, 6), (6, 19), (19, 27)]:
        chunked = kv_cache._kivi_write(chunked, x[:, t0:t1], positions(t0, t1))
    np.testing.assert_array_equal(one_shot.flushed, [24, 8])
    a, b = kv_cache.decode_store(one_shot, jnp.float32), kv_cache.decode_store(chunked, jnp.float32)
    for row, n in enumerate(lengths.tolist()):
        np.testing.assert_array_equal(a[row, :n], b[row, :n])  # same groups, same arithmetic
        flushed = (n // g) * g
        np.testing.assert_array_equal(a[row, flushed:n], x[row, flushed:n])  # residual: exact
        assert float(jnp.abs(a[row, :flushed] - x[row, :flushed]).max()) < 0.5


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "kivi4"])
def test_encode_is_a_write_into_an_empty_store(kind):
    """encode(store, x) is the store of T slots that writing x at positions 0..T-1 into an
    empty one gives (Kivi4: every group flushed), in the store's own layout."""
    x = jax.random.normal(jax.random.key(5), (2, 32, 2, 16), jnp.float32)
    empty = kv_cache.empty_store(kind, x.shape, 8, jnp.float32)
    got = kv_cache.encode(empty, x)
    layer = kv_cache.write(kv_cache.LayerCache(k=empty, v=empty), x, x, jnp.broadcast_to(jnp.arange(32), (2, 32)),
                           impl="xla")
    assert type(got) is type(empty)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(layer.k), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if kind == "kivi4":
        np.testing.assert_array_equal(got.flushed, [32, 32])


@pytest.mark.parametrize("fmt", ["int8", "int4", "k8v4", "kivi4-g32"])
def test_generate_with_quantized_cache_stays_close_to_dense(fmt):
    cfg = _cfg()
    params = model.init_params(cfg, jax.random.key(5))
    params = jax.tree.map(lambda p: p * 5 if p.ndim > 1 else p, params)  # peaky logits
    prompt = jax.random.randint(jax.random.key(6), (2, 12), 1, cfg.vocab_size)
    lengths = jnp.array([12, 7])

    def logits(kv_format):
        cache = kv_cache.create(cfg, 2, 12, kv_format)
        pos = jnp.where(jnp.arange(12)[None] < lengths[:, None], jnp.arange(12)[None], -1)
        out, _ = model.forward(params, cfg, prompt, pos, cache)
        return jax.nn.log_softmax(out, -1)

    ref, got = logits("fp32"), logits(fmt)
    valid = (jnp.arange(12)[None] < lengths[:, None])[..., None]
    kl = jnp.sum(jnp.exp(ref) * (ref - got) * valid) / jnp.sum(valid)
    # Measured: int8 3.4e-6, the int4 sides ~4e-4; a bound 10x above each.
    assert 0 <= float(kl) < (3e-5 if fmt == "int8" else 4e-3)
    tokens, n = generate(params, cfg, prompt, lengths, jax.random.key(0), max_new_tokens=4, kv_format=fmt)
    assert tokens.shape == (2, 4) and n.tolist() == [4, 4]


def test_fp16_to_f32_and_reciprocal_are_exact_for_every_fp16():
    """Both are integer arithmetic (XLA cannot fold away the fp16 rounding of a scale);
    checked against numpy's conversion and IEEE division on all 65,536 bit patterns."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    got = np.asarray(jax.jit(kv_cache.fp16_to_f32)(jnp.asarray(h)))
    want = h.astype(np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), h[~same][:8]
    pos = h[np.isfinite(h) & ~np.signbit(h)]
    inv = np.asarray(jax.jit(kv_cache.reciprocal_fp16)(jnp.asarray(pos)))
    with np.errstate(divide="ignore"):
        want_inv = np.where(pos == 0, np.float32(1), np.float32(1) / pos.astype(np.float32))
    np.testing.assert_array_equal(inv.view(np.uint32), want_inv.astype(np.float32).view(np.uint32))
