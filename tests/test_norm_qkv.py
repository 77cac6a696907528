"""Fused RMSNorm + q/k/v GEMV + RoPE kernels: against their plain-JAX reference (the
model's XLA path) in interpret mode on the CPU and compiled on a GPU, the model's decode
step through them against the same step through XLA, argument errors, and deviceless
lowering of the shipped configuration to Triton."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import kv_cache, model
from ollm_jax.config import ModelConfig
from pallas_kernels import norm_qkv, on_gpu
from tests.lowering import assert_lowers_to_triton

INTERPRET = not on_gpu()


def _inputs(seed, m, e, h, k, d, dtype, bias):
    ks = jax.random.split(jax.random.key(seed), 9)
    x = (3 * jax.random.normal(ks[0], (m, e))).astype(dtype)
    scale = (1 + 0.2 * jax.random.normal(ks[1], (e,))).astype(dtype)
    w_q, w_k, w_v = ((0.05 * jax.random.normal(kk, (e, n, d))).astype(dtype) for kk, n in zip(ks[2:5], (h, k, k)))
    positions = jax.random.randint(ks[5], (m,), 0, 40_000)
    inv = 10000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    biases = tuple((0.1 * jax.random.normal(kk, (n, d))).astype(dtype) for kk, n in zip(ks[6:], (h, k, k)))
    return (x, scale, w_q, w_k, w_v, positions, inv, biases if bias else None)


@pytest.mark.parametrize("m, e, h, k, d, dtype, bias, knobs", [
    (1, 256, 4, 2, 64, jnp.bfloat16, False, {}),  # decode, GQA 2
    (5, 128, 6, 2, 32, jnp.float32, True, {}),  # a verify pass (5 rows), GQA 3, Qwen2's biases
    (8, 512, 8, 1, 128, jnp.bfloat16, True, {"block_e": 128}),  # GQA 8, 4 splits of E
    (3, 192, 4, 4, 64, jnp.bfloat16, False, {"block_e": 64}),  # MHA, E not a power of 2 (3 splits)
    (33, 64, 2, 1, 32, jnp.bfloat16, False, {}),  # more than 16 rows
])
def test_kernel_matches_reference(m, e, h, k, d, dtype, bias, knobs):
    args = _inputs(m * e + d, m, e, h, k, d, dtype, bias)
    got = norm_qkv.norm_qkv_rope(*args, eps=1e-5, interpret=INTERPRET, **knobs)
    want = norm_qkv.norm_qkv_rope_reference(*args, eps=1e-5)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and g.dtype == w.dtype == dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        # The GEMV's f32 sums differ in order only: at most one rounding step of the result
        # (bf16: 2^-8 relative), then through RoPE's rounded products.
        # f32: the kernel's dot is exact f32; XLA's reference may use TF32 on a GPU.
        tol = 2 ** -7 if dtype == jnp.bfloat16 else (1e-5 if INTERPRET else 2e-3)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max(), err_msg=name)


def test_rejects_bad_shapes():
    args = list(_inputs(0, 2, 64, 2, 1, 32, jnp.bfloat16, False))
    with pytest.raises(ValueError, match="block_e"):
        norm_qkv.norm_qkv_rope(*args, eps=1e-5, block_e=48, interpret=True)  # not a power of 2
    args[5] = args[5][:1]  # positions [1] for 2 rows
    with pytest.raises(ValueError, match="positions"):
        norm_qkv.norm_qkv_rope(*args, eps=1e-5, interpret=True)
    small = _inputs(0, 2, 64, 2, 1, 16, jnp.bfloat16, False)  # head_dim 16
    assert not norm_qkv.supports(small[0], small[2], small[3])
    with pytest.raises(ValueError, match="head_dim|D a power"):
        norm_qkv.norm_qkv_rope(*small, eps=1e-5, interpret=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("e, h, k, d", [(2048, 32, 8, 64), (4096, 32, 8, 128)])  # Llama-3.2-1B, Llama-3.1-8B
def test_lowers_to_triton(e, h, k, d, bias):
    s = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = [s((1, e), bf), s((e,), bf), s((e, h, d), bf), s((e, k, d), bf), s((e, k, d), bf), s((1,), jnp.int32),
            s((d // 2,), jnp.float32)]
    if bias:
        args += [s((h, d), bf), s((k, d), bf), s((k, d), bf)]
        fn = lambda *a: norm_qkv.norm_qkv_rope(*a[:7], a[7:], eps=1e-5)  # noqa: E731
    else:
        fn = functools.partial(norm_qkv.norm_qkv_rope, eps=1e-5)
    assert_lowers_to_triton(fn, *args)


@pytest.mark.parametrize("kv_format", ["bf16", "int8"])
def test_model_decode_step_through_the_kernel(kv_format):
    """A decode step with the fused projection (impl "pallas") gives the logits and cache of
    the XLA path, with Qwen2-style biases and GQA."""
    hf = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}
    cfg = ModelConfig.from_hf(hf, dtype="bfloat16")
    assert cfg.qkv_bias
    params = model.init_params(cfg, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x + 0.1, params)  # non-trivial biases and norms
    batch, prompt = 2, 6
    tokens = jax.random.randint(jax.random.key(2), (batch, prompt), 0, cfg.vocab_size)
    cache = kv_cache.create(cfg, batch, 16, kv_format)
    pos = jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32), (batch, prompt))
    _, cache = model.forward(params, cfg, tokens, pos, cache, attention_impl="xla")
    step_tokens = jnp.array([[5], [77]], jnp.int32)
    step_pos = jnp.array([[prompt], [prompt - 2]], jnp.int32)  # ragged rows
    want, want_cache = model.forward(params, cfg, step_tokens, step_pos, cache, attention_impl="xla")
    w_q, w_k, w_v = (params["layers_0"]["attn"][n] for n in ("w_q", "w_k", "w_v"))
    assert model._fused_projection("pallas", cfg, jnp.zeros((batch, 1, cfg.hidden_size)),
                                   *(model.Matrix(w, None, w.shape[1:]) for w in (w_q, w_k, w_v)))
    got, got_cache = model.forward(params, cfg, step_tokens, step_pos, cache, attention_impl="pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0.03, atol=0.03 * float(jnp.abs(want).max()))
    for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        g, w = np.asarray(g).astype(np.float32), np.asarray(w).astype(np.float32)
        assert g.shape == w.shape
        close = np.isclose(g, w, rtol=2 ** -6, atol=2 ** -6 * np.abs(w).max())
        assert close.mean() > 0.99, close.mean()  # int8: a rounding tie may move one code
