"""Llama-family transformer (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) in Flax.

The forward pass is a pure function

    forward(params, cfg, tokens, positions, cache) -> (logits, cache)

used for prefill (many tokens per sequence) and decode (one token per sequence) alike.
The KV cache is an explicit pytree argument and result (`ollm_jax.kv_cache`); nothing
is stored in mutable Flax collections.

Every weight is declared once, in the module that uses it, with its shape, dtype and
logical axis names (`_param`). Initialisation (`init_params`), the shape table used by
loading and conversion checks (`param_specs`) and sharding rules (`logical_axes`) all
derive from those declarations.

Dimensions: B batch, T tokens, E hidden (embed), H query heads, K KV heads,
G = H // K, D head_dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ollm_jax import attention, kv_cache
from ollm_jax.config import ModelConfig
from ollm_jax.patterns import Pattern
from pallas_kernels import on_gpu

Params = dict[str, Any]


class AttentionOptions(NamedTuple):
    """How attention runs (static): see `forward`."""

    impl: str = "auto"
    pattern: Pattern | None = None
    q_offset: int | None = None


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> jax.Array:
    """Declares one weight: its shape, dtype (the config's) and logical axis names."""
    assert len(shape) == len(axes), (name, shape, axes)
    dtype = jnp.dtype(module.cfg.dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


_dense_init = nn.initializers.normal(stddev=0.02)

# The axes each matrix contracts with its input; the others are its output channels, in
# the order they end the product (`_project`). `quantize_weights` stores an int8 matrix
# as uint32 words [N, K/4] (N outputs, K contracted: the int8 KV cache's packing,
# `kv_cache.pack_int8`) and a float32 scale per output, `<name>_scale` [N].
CONTRACTED_AXES = {"w_q": (0,), "w_k": (0,), "w_v": (0,), "w_o": (1, 2), "w_gate": (0,), "w_up": (0,),
                   "w_down": (0,), "lm_head": (0,), "embedding": (1,)}
SCALE_SUFFIX = "_scale"
WEIGHT_FORMATS = ("bf16", "int8")  # "bf16": as stored (the config's dtype)


class Matrix(NamedTuple):
    """A weight matrix as the params hold it: `values` in its declared shape and the
    config's dtype (scale None), or int8 (`quantize_weights`): words [N, K/4] and scale [N]."""

    values: jax.Array
    scale: jax.Array | None
    out_shape: tuple[int, ...]  # the output axes' sizes (N = their product)


def _packed_shape(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """(output shape, N, K) of matrix `name` declared with `shape`."""
    contracted = CONTRACTED_AXES[name]
    out_shape = tuple(n for i, n in enumerate(shape) if i not in contracted)
    return out_shape, math.prod(out_shape), math.prod(shape[i] for i in contracted)


def _matrix(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> Matrix:
    """Declares one matrix (`_param`), or reads its int8 words and scale if the params hold those."""
    out_shape, n, k = _packed_shape(name, shape)
    scale_name = name + SCALE_SUFFIX
    if not module.has_variable("params", scale_name):
        return Matrix(_param(module, name, shape, axes, _dense_init), None, out_shape)
    words, scale = module.get_variable("params", name), module.get_variable("params", scale_name)
    if words.shape != (n, k // 4) or words.dtype != jnp.uint32 or scale.shape != (n,):
        raise ValueError(f"{module.path}/{name}: int8 params must be words uint32 [{n}, {k // 4}] and scale [{n}] "
                         f"(`quantize_weights` of a {shape} matrix); got {words.dtype} {words.shape} and "
                         f"{scale.shape}")
    return Matrix(words, scale, out_shape)


def _project(spec: str, x: jax.Array, w: Matrix, out_dtype=None) -> jax.Array:
    """einsum(spec, x, w) with x's trailing axes contracted and w's output axes ending the
    result, in `out_dtype` (default x's). An int8 matrix runs as `pallas_kernels.gemv_int8`
    on a GPU for up to its MAX_ROWS rows of x (decode, verify), which reads the int8 bytes;
    otherwise (prefill, CPU) as its plain-JAX reference, an XLA dot of the widened values."""
    out_dtype = out_dtype or x.dtype
    if w.scale is None:
        return jnp.einsum(spec, x, w.values, preferred_element_type=out_dtype)
    from pallas_kernels import gemv_int8  # the kernels import this package

    k = 4 * w.values.shape[1]
    rows = x.reshape(-1, k)  # [M, K]: the contracted axes end x
    if _int8_kernel(x, w):
        y = gemv_int8.gemv_int8(rows, w.values, w.scale, out_dtype=out_dtype)
    else:
        y = gemv_int8.gemv_int8_reference(rows, w.values, w.scale, out_dtype=out_dtype)
    contracted = len(spec.split(",")[1].split("->")[0]) - len(w.out_shape)  # w's subscripts not in the output
    return y.reshape(*x.shape[: x.ndim - contracted], *w.out_shape)


def _int8_kernel(x: jax.Array, w: Matrix) -> bool:
    """Whether x's product with int8 matrix w runs as `pallas_kernels.gemv_int8`: on a GPU,
    for decode-sized x (its rows, the contracted axes ending x, <= the kernel's MAX_ROWS)."""
    if w.scale is None or not on_gpu():
        return False
    from pallas_kernels import gemv_int8

    k = 4 * w.values.shape[1]
    return gemv_int8.supports(x.reshape(-1, k), w.values)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, as Hugging Face: normalise in float32, cast back, scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


class RMSNorm(nn.Module):
    cfg: ModelConfig
    dim: int

    def setup(self):
        self.scale = _param(self, "scale", (self.dim,), ("norm",), nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale, self.cfg.rms_norm_eps)


@functools.lru_cache(maxsize=64)
def _inv_frequencies(cfg: ModelConfig) -> tuple[float, ...]:
    """RoPE inverse frequencies [D/2], with llama3 or linear scaling if configured."""
    d = cfg.head_dim
    inv = [cfg.rope_theta ** (-(2 * i) / d) for i in range(d // 2)]
    rs = cfg.rope_scaling
    if rs is None:
        return tuple(inv)
    if rs.rope_type == "linear":
        return tuple(f / rs.factor for f in inv)
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return tuple(out)


def inv_frequencies(cfg: ModelConfig) -> jax.Array:
    """The config's RoPE inverse frequencies [D/2] f32 (scaling applied)."""
    return jnp.asarray(_inv_frequencies(cfg), jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout) with the config's frequencies."""
    return rope(x, positions, inv_frequencies(cfg))


def rope(x: jax.Array, positions: jax.Array, inv: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [B, T, N, D], positions [B, T], inv [D/2] f32."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)  # [B, T, 1, D/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)  # [B, T, N, D/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, norm: RMSNorm, positions, layer_cache, attn: AttentionOptions):
        """x [B, T, E] the residual stream, normalised here by `norm` (its owner is the
        block; the fused decode kernel reads its scale)."""
        cfg = self.cfg
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        b, t = x.shape[:2]
        w_q = _matrix(self, "w_q", (e, h, d), ("embed", "q_heads", "head_dim"))
        w_k = _matrix(self, "w_k", (e, k, d), ("embed", "kv_heads", "head_dim"))
        w_v = _matrix(self, "w_v", (e, k, d), ("embed", "kv_heads", "head_dim"))
        # [E, H, D]: the decode GEMV reduces over the minor (H, D) axes, a row reduction XLA
        # fuses with its multiply; as [H, D, E] it wrote an [H, D, E] temporary per layer.
        w_o = _matrix(self, "w_o", (e, h, d), ("embed", "q_heads", "head_dim"))
        biases = None
        if cfg.qkv_bias:
            biases = (_param(self, "b_q", (h, d), ("q_heads", "head_dim"), nn.initializers.zeros),
                      _param(self, "b_k", (k, d), ("kv_heads", "head_dim"), nn.initializers.zeros),
                      _param(self, "b_v", (k, d), ("kv_heads", "head_dim"), nn.initializers.zeros))

        write_impl = attn.impl
        if _fused_projection(attn.impl, cfg, x, w_q, w_k, w_v):
            from pallas_kernels import norm_qkv  # the kernels import this package

            q, k_new, v_new = norm_qkv.norm_qkv_rope(
                x.reshape(b * t, e), norm.scale, w_q.values, w_k.values, w_v.values, positions.reshape(b * t),
                inv_frequencies(cfg), biases, eps=cfg.rms_norm_eps, interpret=not on_gpu(),
            )  # [B*T, H, D], [B*T, K, D] x 2
            q, k_new, v_new = (y.reshape(b, t, *y.shape[1:]) for y in (q, k_new, v_new))
            write_impl = "pallas"  # K and V in one append launch, dense stores too
        else:
            xn = norm(x)  # [B, T, E]
            q = _project("bte,ehd->bthd", xn, w_q)  # [B, T, H, D]
            k_new = _project("bte,ekd->btkd", xn, w_k)  # [B, T, K, D]
            v_new = _project("bte,ekd->btkd", xn, w_v)  # [B, T, K, D]
            if biases is not None:
                q, k_new, v_new = q + biases[0], k_new + biases[1], v_new + biases[2]
            if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim, before RoPE.
                q = RMSNorm(cfg, d, name="q_norm")(q)
                k_new = RMSNorm(cfg, d, name="k_norm")(k_new)
            q = apply_rope(q, positions, cfg)
            k_new = apply_rope(k_new, positions, cfg)

        layer_cache = kv_cache.write(layer_cache, k_new, v_new, positions, impl=write_impl)
        out = attention.attend(
            q, layer_cache, positions, sliding_window=cfg.sliding_window, pattern=attn.pattern,
            q_offset=attn.q_offset, impl=attn.impl,
        )  # [B, T, H, D]
        out = _project("bthd,ehd->bte", out, w_o)  # [B, T, E]
        if cfg.o_bias:
            out = out + _param(self, "b_o", (e,), ("embed",), nn.initializers.zeros)
        return out, layer_cache


def _fused_projection(impl: str, cfg: ModelConfig, x: jax.Array, w_q: Matrix, w_k: Matrix, w_v: Matrix) -> bool:
    """Whether the q/k/v projection runs as the fused Pallas kernels (`pallas_kernels.norm_qkv`):
    under "pallas" only (interpret mode off the GPU), for decode-sized steps (B x T <= its
    MAX_ROWS), not with Qwen3's qk-norm (between the GEMV and RoPE) nor quantized weights. "auto"
    keeps XLA's path, which measured faster on an H200 (see that module)."""
    if cfg.qk_norm or impl != "pallas" or any(w.scale is not None for w in (w_q, w_k, w_v)):
        return False
    from pallas_kernels import norm_qkv

    b, t, e = x.shape
    return norm_qkv.supports(x.reshape(b * t, e), w_q.values, w_k.values)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        e, f = self.cfg.hidden_size, self.cfg.intermediate_size
        w_gate = _matrix(self, "w_gate", (e, f), ("embed", "mlp"))
        w_up = _matrix(self, "w_up", (e, f), ("embed", "mlp"))
        w_down = _matrix(self, "w_down", (f, e), ("mlp", "embed"))
        if _int8_kernel(x, w_gate) and w_up.scale is not None:  # both int8 matrices in one launch
            from pallas_kernels import gemv_int8

            b, t = x.shape[:2]
            hidden = gemv_int8.gemv_int8_glu(x.reshape(b * t, e), w_gate.values, w_gate.scale, w_up.values,
                                             w_up.scale).reshape(b, t, f)  # [B, T, F]
        else:
            gate = _project("bte,ef->btf", x, w_gate)  # [B, T, F]
            up = _project("bte,ef->btf", x, w_up)  # [B, T, F]
            hidden = jax.nn.silu(gate) * up
        return _project("btf,fe->bte", hidden, w_down)  # [B, T, E]


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache, attn: AttentionOptions):
        e = self.cfg.hidden_size
        attn_out, layer_cache = Attention(self.cfg, name="attn")(
            x, RMSNorm(self.cfg, e, name="attn_norm"), positions, layer_cache, attn
        )
        x = x + attn_out
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, e, name="mlp_norm")(x))
        return x, layer_cache


class Transformer(nn.Module):
    cfg: ModelConfig
    attn: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, tokens, positions, cache: kv_cache.KVCache, logits_index=None):
        cfg = self.cfg
        embedding = _matrix(self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        x = jnp.take(embedding.values, tokens, axis=0)  # [B, T, E] (int8: words [B, T, E/4])
        if embedding.scale is not None:  # int8 rows, a scale per row
            rows = kv_cache.unpack_int8(x).astype(jnp.float32)  # [B, T, E]
            x = (rows * jnp.take(embedding.scale, tokens)[..., None]).astype(cfg.dtype)
        layers = []
        for i in range(cfg.num_layers):
            x, layer = Block(cfg, name=f"layers_{i}")(x, positions, cache.layers[i], self.attn)
            layers.append(layer)
        x = RMSNorm(cfg, cfg.hidden_size, name="final_norm")(x)
        if logits_index is not None:  # only the rows whose logits are wanted: [B, N, E]
            x = jnp.take_along_axis(x, logits_index[:, :, None], axis=1)
        if cfg.tie_word_embeddings:
            logits = _project("bne,ve->bnv", x, embedding, jnp.float32)
        else:
            w_lm = _matrix(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
            logits = _project("bne,ev->bnv", x, w_lm, jnp.float32)
        return logits, kv_cache.advance(cache, tuple(layers), positions)


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: kv_cache.KVCache,
    *,
    logits_index: jax.Array | None = None,
    attention_impl: str = "auto",
    attention_pattern: Pattern | None = None,
    q_offset: int | None = None,
) -> tuple[jax.Array, kv_cache.KVCache]:
    """Runs the model over new tokens, writing their keys/values into the cache.

    Args:
      params: the parameter pytree (`init_params`, `ollm_jax.load`).
      cfg: the model config (hashable; static under jit).
      tokens: [B, T] int32 token ids.
      positions: [B, T] int32 absolute positions; -1 marks padding. A row's valid
        positions are consecutive and come first (start, start + 1, ..., then -1s).
      cache: the KV cache (`kv_cache.create`).
      logits_index: optional [B, N] indices into T; logits only for those tokens.
      attention_impl: kernels or references: "auto" (Pallas kernels on a GPU), "xla" or
        "pallas" (or "cudnn" for prefill); passed to `ollm_jax.attention.attend` and
        `ollm_jax.kv_cache.write`. "pallas" also runs a decode-sized step's RMSNorm, q/k/v
        projection and RoPE as the fused `pallas_kernels.norm_qkv` kernels.
      attention_pattern: a sparsity pattern (`ollm_jax.patterns`) instead of dense causal
        (or the config's sliding window), for exploration; static.
      q_offset: the position of every row's first token when it is one static number
        (0 for a prefill from an empty cache); None reads it from `positions`.
    Returns:
      logits [B, T or N, V] float32, and the updated cache.
    """
    attn = AttentionOptions(attention_impl, attention_pattern, q_offset)
    return Transformer(cfg, attn).apply({"params": params}, tokens, positions, cache, logits_index)


def _init_boxed(cfg: ModelConfig, key: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = kv_cache.create(cfg, batch=1, max_len=1)
    return Transformer(cfg).init(key, tokens, tokens, cache)["params"]


def param_specs(cfg: ModelConfig) -> Params:
    """The shape/dtype of every weight: a pytree of `jax.ShapeDtypeStruct`."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0))
    return nn.meta.unbox(boxed)


def logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every weight: a pytree of `PartitionSpec`s."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random weights (normal(0.02) matrices, unit norms, zero biases)."""
    return nn.meta.unbox(_init_boxed(cfg, key))


@functools.partial(jax.jit, static_argnums=1)
def _quantize_int8(w: jax.Array, contracted: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """w -> (words uint32 [N, K/4], scale f32 [N]): symmetric, absmax / 127 per output."""
    out_axes = tuple(i for i in range(w.ndim) if i not in contracted)
    w = jnp.transpose(w, out_axes + contracted).astype(jnp.float32)  # outputs first
    w = w.reshape(math.prod(w.shape[: len(out_axes)]), -1)  # [N, K]
    amax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # [N, 1]
    values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return kv_cache.pack_int8(values), scale[:, 0]


def quantize_weights(params: Params, weight_format: str = "int8", matrices=None) -> Params:
    """The params with the matrices named in `matrices` (default: all, `CONTRACTED_AXES`)
    in `weight_format`.

    "int8": weight-only, symmetric, a float32 scale per output channel, stored as words
    [N, K/4] (`<name>`) and scale [N] (`<name>_scale`); norms, biases and the matrices not
    named stay as they are. `forward` takes the result as it takes the original
    (activations stay in the config's dtype); at decode on a GPU each int8 matrix runs as
    `pallas_kernels.gemv_int8` (w_gate and w_up together as its GLU form), reading half
    the bytes of bf16: gpt-fast's int8 weight-only mode, and what a draft model for
    speculative decoding wants. "bf16" returns the params as given.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format {weight_format!r}: expected one of {WEIGHT_FORMATS}")
    names = set(CONTRACTED_AXES if matrices is None else matrices)
    if names - set(CONTRACTED_AXES):
        raise ValueError(f"matrices {sorted(names - set(CONTRACTED_AXES))}: expected names of {list(CONTRACTED_AXES)}")
    if weight_format == "bf16":
        return params

    def walk(tree: Params) -> Params:
        out = {}
        for name, x in tree.items():
            if isinstance(x, dict):
                out[name] = walk(x)
            elif name in names:
                if name + SCALE_SUFFIX in tree:
                    raise ValueError(f"{name}: already quantized ({x.dtype} {x.shape} with a {name}{SCALE_SUFFIX})")
                out[name], out[name + SCALE_SUFFIX] = _quantize_int8(x, CONTRACTED_AXES[name])
            else:
                out[name] = x
        return out

    return walk(params)


def num_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def param_bytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
