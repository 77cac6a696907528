"""int8 weight-only matrices (`model.quantize_weights`): the stored words and scales
against exact arithmetic, the forward pass against the same model with the dequantized
weights, and `pallas_kernels.gemv_int8` (interpret mode) against its reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import convert, kv_cache, model
from ollm_jax.config import ModelConfig
from ollm_jax.model import CONTRACTED_AXES, SCALE_SUFFIX, quantize_weights
from pallas_kernels import gemv_int8
from tests.conftest import STORIES260K, TINY_HF, require
from tests.lowering import assert_lowers_to_triton


@pytest.fixture(scope="module")
def stories():
    params, hf = convert.load_hf_dir(require(STORIES260K, "stories260K"), dtype="float32", progress=False)
    return ModelConfig.from_hf(hf, dtype="float32"), params


def _as_rows(w: np.ndarray, name: str) -> np.ndarray:
    """A declared matrix as [N outputs, K contracted] float64 (the stored order)."""
    contracted = CONTRACTED_AXES[name]
    out_axes = tuple(i for i in range(w.ndim) if i not in contracted)
    w = np.transpose(np.asarray(w, np.float64), out_axes + contracted)
    return w.reshape(math.prod(w.shape[: len(out_axes)]), -1)


def _pairs(params, qparams, prefix=""):
    """(path, name, original, words, scale) for every matrix."""
    for name, x in params.items():
        if isinstance(x, dict):
            yield from _pairs(x, qparams[name], f"{prefix}{name}/")
        elif name in CONTRACTED_AXES:
            yield f"{prefix}{name}", name, x, qparams[name], qparams.get(name + SCALE_SUFFIX)


def _dequantized(params, qparams):
    """The original params with every int8 matrix replaced by its values x scale (float32,
    declared layout): what an exact dequantization gives."""
    out = jax.tree.map(lambda x: x, params)
    for path, name, w, words, scale in _pairs(params, qparams):
        if scale is None:  # left unquantized
            continue
        rows = np.asarray(kv_cache.unpack_int8(words), np.float32) * np.asarray(scale)[:, None]  # [N, K]
        contracted = CONTRACTED_AXES[name]
        out_axes = tuple(i for i in range(w.ndim) if i not in contracted)
        stored = rows.reshape([w.shape[i] for i in out_axes + contracted])
        node = out
        for part in path.split("/")[:-1]:
            node = node[part]
        node[name] = jnp.asarray(np.transpose(stored, np.argsort(out_axes + contracted)))
    return out


def test_int8_words_hold_the_nearest_step_per_output_channel(stories):
    cfg, params = stories
    qparams = quantize_weights(params, "int8")
    pairs = list(_pairs(params, qparams))
    assert len(pairs) == 1 + 7 * cfg.num_layers + (not cfg.tie_word_embeddings)
    for path, name, w, words, scale in pairs:
        rows = _as_rows(w, name)  # [N, K]
        assert words.dtype == jnp.uint32 and words.shape == (rows.shape[0], rows.shape[1] // 4), path
        want_scale = np.max(np.abs(rows), axis=1) / 127  # per output channel
        np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-6, err_msg=path)
        q = np.asarray(kv_cache.unpack_int8(words), np.float64)
        step = np.asarray(scale, np.float64)[:, None]
        error = np.abs(q * step - rows)
        assert np.all(error <= step / 2 * (1 + 1e-5)), (path, float(np.max(error / step)))
        assert np.all(np.max(np.abs(q), axis=1) == 127), path  # the absmax maps to 127
    assert qparams["final_norm"]["scale"] is params["final_norm"]["scale"]  # norms untouched


@pytest.mark.parametrize("which", ["tiny", "stories"])  # untied lm_head; tied embedding (stories260K)
def test_forward_with_int8_weights_equals_forward_with_their_dequantized_values(which, tiny, stories):
    cfg, params = {"tiny": tiny, "stories": stories}[which]
    qparams = quantize_weights(params, "int8")
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 3, cfg.vocab_size, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))

    def run(p):  # prefill 7 tokens, then one decode step
        cache = kv_cache.create(cfg, 2, 16)
        logits, cache = model.forward(p, cfg, tokens, positions, cache)
        step, _ = model.forward(p, cfg, tokens[:, :1], positions[:, -1:] + 1, cache)
        return np.asarray(logits), np.asarray(step)

    got, want = run(qparams), run(_dequantized(params, qparams))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.abs(w).max())
    exact = run(params)  # ...and near the float32 model itself (a wrong scale axis is far off)
    for g, w in zip(got, exact):
        assert np.abs(g - w).max() < 0.05 * np.abs(w).max()


KERNEL_SIZED_HF = dict(TINY_HF, hidden_size=64, intermediate_size=128, head_dim=16)  # every K/4 and N % 16 == 0


def test_forward_with_some_int8_matrices_at_kernel_sized_shapes():
    """Only the MLP and the LM head in int8, at shapes gemv_int8 takes (on a GPU this runs
    the kernels, gemv_int8_glu included; on the CPU their reference)."""
    cfg = ModelConfig.from_hf(KERNEL_SIZED_HF, dtype="float32")
    params = jax.tree.map(lambda x: x * 20 if x.ndim > 1 else x, model.init_params(cfg, jax.random.key(3)))
    qparams = quantize_weights(params, "int8", matrices=("w_gate", "w_up", "w_down", "lm_head"))
    assert qparams["layers_0"]["attn"]["w_q"] is params["layers_0"]["attn"]["w_q"]
    assert qparams["lm_head"].dtype == jnp.uint32 and "embedding" + SCALE_SUFFIX not in qparams
    tokens = jax.random.randint(jax.random.key(4), (3, 5), 3, cfg.vocab_size, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 5))

    def run(p):  # prefill 4 tokens (15 rows: the kernels on a GPU), then one decode step
        cache = kv_cache.create(cfg, 3, 8)
        logits, cache = model.forward(p, cfg, tokens[:, :4], positions[:, :4], cache)
        step, _ = model.forward(p, cfg, tokens[:, 4:], positions[:, 4:], cache)
        return np.asarray(logits), np.asarray(step)

    got, want = run(qparams), run(_dequantized(params, qparams))
    for g, w in zip(got, want):  # fp16 x in the kernels: ~1e-3 relative
        np.testing.assert_allclose(g, w, rtol=3e-3, atol=3e-3 * np.abs(w).max())


def test_bad_formats_mismatched_and_double_quantized_params_are_refused(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="'int3'"):
        quantize_weights(params, "int3")
    assert quantize_weights(params, "bf16") is params
    qparams = quantize_weights(params, "int8")
    with pytest.raises(ValueError, match=r"matrices \['w_qkv'\]"):
        quantize_weights(params, "int8", matrices=("w_q", "w_qkv"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights(qparams, "int8")
    qparams["layers_0"]["mlp"]["w_up"] = qparams["layers_0"]["mlp"]["w_up"][:, :-1]
    tokens = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"w_up: int8 params must be words uint32 \[64, 8\]"):
        model.forward(qparams, cfg, tokens, tokens, kv_cache.create(cfg, 1, 4))


# ----------------------------------------------------------------------------- the kernel

KERNEL_CASES = [  # M, N, K, knobs
    (1, 64, 256, {}),
    (1, 64, 256, {"num_splits": 2, "block_kw": 32}),
    (5, 48, 512, {"num_splits": 2, "block_kw": 32}),
    (3, 32, 128, {"transposed": 0}),
    (16, 256, 2048, {"block_n": 32, "num_splits": 4}),
    (8, 2048, 512, {}),  # default splits: 128 programs x 2
]


@pytest.mark.parametrize("m, n, k, knobs", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gemv_int8_matches_its_reference(m, n, k, knobs, dtype):
    ks = jax.random.split(jax.random.key(m * n + k), 3)
    x = (4 * jax.random.normal(ks[0], (m, k))).astype(dtype)
    words = kv_cache.pack_int8(jax.random.randint(ks[1], (n, k), -127, 128).astype(jnp.int8))
    scale = jax.random.uniform(ks[2], (n,), minval=1e-3, maxval=1e-2)
    got = gemv_int8.gemv_int8(x, words, scale, interpret=True, **knobs)
    want = gemv_int8.gemv_int8_reference(x, words, scale)
    assert got.shape == (m, n) and got.dtype == dtype
    # fp16 x (exact for these bf16 values; f32 rounded to 11 bits) and f32 accumulation
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    logits = gemv_int8.gemv_int8(x, words, scale, out_dtype=jnp.float32, interpret=True, **knobs)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("m, n, k, knobs", [(1, 64, 256, {}), (1, 32, 128, {"block_kw": 16}),
                                            (7, 128, 512, {"block_n": 32, "block_kw": 32}),
                                            (2, 32, 128, {"transposed": 0})])
def test_gemv_int8_glu_matches_its_reference(m, n, k, knobs):
    ks = jax.random.split(jax.random.key(m + n + k), 5)
    x = (2 * jax.random.normal(ks[0], (m, k))).astype(jnp.bfloat16)
    mats = []
    for kw_, ks_ in ((ks[1], ks[2]), (ks[3], ks[4])):
        mats += [kv_cache.pack_int8(jax.random.randint(kw_, (n, k), -127, 128).astype(jnp.int8)),
                 jax.random.uniform(ks_, (n,), minval=1e-3, maxval=5e-3)]
    got = gemv_int8.gemv_int8_glu(x, *mats, interpret=True, **knobs)
    want = gemv_int8.gemv_int8_glu_reference(x, *mats)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    with pytest.raises(ValueError, match="one split with glu"):
        gemv_int8.gemv_int8_glu(x, *mats, num_splits=2, block_kw=16, interpret=True)


def test_gemv_int8_refuses_bad_shapes():
    x = jnp.zeros((17, 64), jnp.bfloat16)
    words = jnp.zeros((32, 16), jnp.uint32)
    with pytest.raises(ValueError, match=r"x.shape=\(17, 64\)"):
        gemv_int8.gemv_int8(x, words, jnp.ones((32,)), interpret=True)
    with pytest.raises(ValueError, match="block_n must divide"):
        gemv_int8.gemv_int8(x[:4], words, jnp.ones((32,)), block_n=48, interpret=True)


@pytest.mark.parametrize("m, n, k", [(1, 8192, 2048), (5, 8192, 2048), (1, 2048, 8192), (5, 2048, 8192),
                                     (8, 128256, 2048), (1, 128256, 2048), (1, 512, 2048)])
def test_gemv_int8_lowers_for_cuda_at_llama_1b_shapes(m, n, k):
    """The default configuration compiles to Triton IR for the shapes the 1B draft runs."""
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 4), jnp.uint32),
            jax.ShapeDtypeStruct((n,), jnp.float32))
    assert_lowers_to_triton(gemv_int8.gemv_int8, *args)
    if n == 8192:  # the MLP's gate and up in one launch
        assert_lowers_to_triton(gemv_int8.gemv_int8_glu, *args, *args[1:])
