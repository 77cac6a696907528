"""The KV cache: one pytree value passed into the model and returned by it.

This module is the only owner of the cache layout and its storage formats. Model code
sees a few calls:

  create(cfg, batch, max_len, kv_format)   -> KVCache
  write(layer, k, v, positions)             -> LayerCache   (quantize + append/update)
  read(layer, dtype)                        -> (k, v) dense, for the attention reference
  advance(cache, layers, positions)         -> KVCache with lengths grown
  set_lengths(cache, lengths)               -> roll back/forward without touching data

The attention dispatch (`ollm_jax.attention`) may also hand a layer's stores to a kernel
that reads the quantized data directly (`pallas_kernels.flash_decode`).

## Formats
Each of K and V is held in one *store*. Dense stores are token-major, [B, S, K, ...];
quantized ones are head-major, [B, K, S, ...], so that one KV head's slots are one
contiguous stretch: the decode kernel reads a head's 64-byte rows of int4 words (128 for
int8) back to back, where token-major they lie K rows apart and read at about 65% of the
copy bandwidth on an H200 against 85% (bench/results/2026-11-27-h200-kv_quant-status.md,
session 10).

  Dense(x)               x [B, S, K, D] bf16/fp16/fp32
  Int8(q, scale)         symmetric, a scale per token per KV head:
                         x[b,s,k,:] ~= n[b,k,s,:] * scale[b,k,s] with int8 n; four values
                         a 32-bit word: byte c of q[..., j] is channel j + c * D/4 (the
                         four quarters of head_dim), so q is uint32 [B, K, S, D/4];
                         scale fp16 [B, K, S]. (Words, not bytes: a GPU kernel reads a
                         word and hands four fp16 values to four dots, where a byte
                         array costs a shared-memory load per value.)
  Int4(q, scale_zero)    asymmetric, a scale and zero point per group of `group`
                         consecutive channels of one token and head; four values a 16-bit
                         word: nibble e (bits 4e..4e+3) of q[..., j] is channel j + e * D/4
                         (the quarters of head_dim, as Int8), so q is uint16 [B, K, S, D/4];
                         x[..., d] ~= n[..., d] * scale[..., d // group] + zero[..., d // group]
                         with n in [0, 15]; scale_zero fp16 [B, K, S, D / group, 2] holds
                         each group's (scale, zero) side by side, so a token's statistics
                         are one stretch of 4 N bytes (`scale` and `zero` read them apart).
                         Kept as two arrays (four small streams to a K/V pair), the same
                         bytes cost the int4-g64 decode kernel at 128k 46.8 against 41.4 us
                         at batch 1 and 331.1 against 292.3 at batch 8 on an H200
                         (bench/fd_scale_streams.py, bench/results/2026-11-27-h200-kv_quant-status.md).

  Kivi4(q, scale_zero, residual, flushed)
                         KIVI-style keys: int4 per *channel*, a scale and zero point per
                         channel for each group of `group` consecutive tokens; q packed as
                         in Int4 (uint16 [B, K, S, D/4]); scale_zero fp16 [B, K, S/group, 2, D],
                         a token group's row of scales then its row of zero points.
                         A token's group can only be quantized once all its tokens exist,
                         so the most recent tokens, positions [flushed, flushed + group),
                         stay in full precision in `residual` [B, K, group, D] (slot
                         p % group) and are flushed into the quantized store a group at a time.

`kv_format` names: "bf16", "fp16", "fp32" (dense), "int8", "int4", "k8v4" (keys int8,
values int4), "k4v8", and "kivi4" (Kivi4 keys, Int4 values); int4 and kivi4 sides take a
group suffix "-g32", "-g64" or "-g128" (default 64; an Int4 group is at most head_dim),
e.g. "int4-g128", "k8v4-g32" or "kivi4-g32".

Dimensions: B batch, S cache slots (max length), T new tokens, K KV heads, D head_dim,
N = D / group quantization groups per token and head.

Positions convention: `positions[b, t]` is the absolute position of new token t of
sequence b, or -1 for padding. Padding is never written and never counts in `lengths`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ollm_jax.config import ModelConfig
from pallas_kernels import on_gpu

DENSE_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
QUANTIZED = ("int8", "int4", "kivi4")
MIXED = {"k8v4": ("int8", "int4"), "k4v8": ("int4", "int8"), "kivi4": ("kivi4", "int4")}
KV_FORMATS = (*DENSE_DTYPES, "int8", "int4", *MIXED)
INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 64
KERNEL_WRITES_DENSE = False  # "auto" writes dense stores with XLA (see `_kernel_writes`)
SCALE_DTYPE = jnp.float16  # scales and zero points: fp16 keeps int8 at 1.94x even for D=64
# Scales are statistics times these f32 constants (not divided by 127 or 15), and values
# are multiplied by `reciprocal_fp16(scale)` (not divided by the scale): a division's
# result depends on the backend (XLA's GPU f32 division is `div.full`, Triton's too,
# the CPU's is IEEE), a multiplication's does not, so the fused GPU kernel
# (`pallas_kernels.quantize_append`) reproduces this module bit for bit.
INV127 = np.float32(1.0) / np.float32(127.0)
INV15 = np.float32(1.0) / np.float32(15.0)


# ----------------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """A parsed `kv_format`: the storage of keys and of values (hashable, static)."""

    k: str  # "bf16" | "fp16" | "fp32" | "int8" | "int4" | "kivi4"
    v: str
    group: int = DEFAULT_INT4_GROUP  # int4: channels per scale (<= head_dim); kivi4: tokens

    @property
    def quantized(self) -> bool:
        return self.k in QUANTIZED or self.v in QUANTIZED


@functools.lru_cache(maxsize=None)
def parse_format(kv_format: str) -> KVFormat:
    """Parses a `kv_format` name (see the module docstring); ValueError names bad ones."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:-g(\d+))?", kv_format)
    base, group = (m.group(1), m.group(2)) if m else (kv_format, None)
    if base not in KV_FORMATS:
        raise ValueError(f"unsupported {kv_format=}; supported: {', '.join(KV_FORMATS)} (int4 sides take -g32/-g64/-g128)")
    k, v = MIXED.get(base, (base, base))
    if group is None:
        return KVFormat(k, v)
    if "int4" not in (k, v) and "kivi4" not in (k, v):
        raise ValueError(f"{kv_format=}: a group size applies only to formats with an int4 side")
    if int(group) not in INT4_GROUPS:
        raise ValueError(f"{kv_format=}: int4 group size {group} not in {INT4_GROUPS}")
    return KVFormat(k, v, int(group))


def resolve_format(cfg: ModelConfig, kv_format: str | None) -> str:
    """The format name to use; `None` means "the model's own dtype", dense."""
    if kv_format is None:
        kv_format = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[cfg.dtype]
    parse_format(kv_format)  # validates
    return kv_format


# ------------------------------------------------------------------------------ stores


@struct.dataclass
class Dense:
    x: jax.Array  # [B, S, K, D]  (token-major)


@struct.dataclass
class Int8:
    q: jax.Array  # [B, K, S, D/4] uint32 (head-major): byte c of word j is channel j + c * D/4, int8
    scale: jax.Array  # [B, K, S] fp16


@struct.dataclass
class Int4:
    q: jax.Array  # [B, K, S, D/4] uint16 (head-major): nibble e of word j is channel j + e * D/4
    scale_zero: jax.Array  # [B, K, S, N, 2] fp16: group n's scale at [..., n, 0], its zero point at [..., n, 1]

    @property
    def group(self) -> int:
        return 4 * self.q.shape[-1] // self.scale_zero.shape[-2]

    @property
    def scale(self) -> jax.Array:  # [B, K, S, N]
        return self.scale_zero[..., 0]

    @property
    def zero(self) -> jax.Array:  # [B, K, S, N]
        return self.scale_zero[..., 1]


@struct.dataclass
class Kivi4:
    q: jax.Array  # [B, K, S, D/4] uint16 (head-major), packed as Int4; S a multiple of the group
    scale_zero: jax.Array  # [B, K, S/group, 2, D] fp16: per channel, per group of tokens; [..., 0, :] scales
    residual: jax.Array  # [B, K, group, D] full precision: positions [flushed, flushed + group)
    flushed: jax.Array  # [B] int32: positions < flushed are in the quantized store

    @property
    def group(self) -> int:
        return self.residual.shape[2]

    @property
    def scale(self) -> jax.Array:  # [B, K, S/group, D]
        return self.scale_zero[..., 0, :]

    @property
    def zero(self) -> jax.Array:  # [B, K, S/group, D]
        return self.scale_zero[..., 1, :]


Store = Dense | Int8 | Int4 | Kivi4


def dims(store: Store) -> tuple[int, int, int, int]:
    """(B, S, K, D) of the values a store holds, whatever its layout."""
    data = jax.tree.leaves(store)[0]  # x, or the packed q
    if isinstance(store, Dense):
        return data.shape
    b, k, s, _ = data.shape
    return b, s, k, head_dim(store)


def fp16_to_f32(h: jax.Array) -> jax.Array:
    """An fp16 array as f32, built from its bits with integer arithmetic.

    Equal to `h.astype(jnp.float32)`, but XLA cannot fuse it away: with its default
    `xla_allow_excess_precision`, XLA's GPU simplifier folds f32 -> fp16 -> f32 round trips
    into the unrounded f32, so a scale computed and used in one jit would not be the fp16
    scale that is stored (and that the Pallas kernel, which rounds, uses). Encoding reads
    its own scales and zero points through this so both give the same bits.
    """
    b = jax.lax.bitcast_convert_type(h.astype(jnp.float16), jnp.uint16).astype(jnp.int32)
    sign, e5, m10 = b >> 15, (b >> 10) & 31, b & 1023
    # Normal and inf/nan: rebias the exponent (15 -> 127), widen the significand.
    e8 = jnp.where(e5 == 31, 255, e5 + 112)
    wide = jax.lax.bitcast_convert_type((sign << 31) | (e8 << 23) | (m10 << 13), jnp.float32)
    # Zero and subnormal: m10 * 2^-24 (an exact int -> f32 conversion and power-of-2 scaling).
    small = jnp.where(sign == 1, -1.0, 1.0) * m10.astype(jnp.float32) * np.float32(2.0**-24)
    return jnp.where(e5 == 0, small, wide)


def reciprocal_fp16(scale: jax.Array) -> jax.Array:
    """1 / scale as f32, correctly rounded (IEEE), for fp16 scales >= 0; 0 -> 1, inf -> 0.

    Integer arithmetic only, so every backend (XLA CPU and GPU, a Triton kernel) gives
    the same bits: an fp16 value is m * 2^(e - 137) with an 11-bit significand m in
    [1024, 2047] (e: its f32 biased exponent), so 1 / scale = round(2^34 / m) * 2^(103 - e),
    and round(2^34 / m) in [2^23, 2^24] is an exact integer division (no ties: m would
    have to divide 2^35 without dividing 2^34).
    """
    s32 = fp16_to_f32(scale)
    bits = jax.lax.bitcast_convert_type(jnp.where(s32 == 0, 1.0, s32), jnp.int32)
    e = bits >> 23  # biased exponent (the sign bit is 0)
    m = ((bits >> 13) & 1023) + 1024  # the significand; fp16 leaves the low 13 bits 0
    a = jax.lax.div(jnp.int32(1 << 30), m)  # 2^34 / m = 16 * 2^30 / m, in int32 steps
    r = ((1 << 30) - a * m) * 16
    b = jax.lax.div(r, m)
    q = a * 16 + b + (2 * (r - b * m) > m).astype(jnp.int32)  # round(2^34 / m)
    inv = jax.lax.bitcast_convert_type(((253 - e) << 23) + q - (1 << 23), jnp.float32)
    return jnp.where(s32 == jnp.inf, 0.0, inv)


def _pack_quarters(n: jax.Array, bits: int, dtype) -> jax.Array:
    """Unsigned values of `bits` bits [..., D] -> words of `dtype` [..., D/4]: field e
    (bits e*bits ..) of word j is channel j + e * D/4, the quarters of head_dim."""
    *lead, d = n.shape
    quarters = n.astype(dtype).reshape(*lead, 4, d // 4)
    return functools.reduce(jnp.bitwise_or, [quarters[..., e, :] << (bits * e) for e in range(4)])


def _unpack_quarters(q: jax.Array, bits: int) -> jax.Array:
    """Words [..., D/4] -> their fields [..., D] in channel order (q's dtype)."""
    return jnp.concatenate([(q >> (bits * e)) & ((1 << bits) - 1) for e in range(4)], axis=-1)


def pack_int8(n: jax.Array) -> jax.Array:
    """int8 [..., D] -> uint32 words [..., D/4]: byte c of word j is channel j + c * D/4."""
    return _pack_quarters(jax.lax.bitcast_convert_type(n, jnp.uint8), 8, jnp.uint32)


def unpack_int8(q: jax.Array) -> jax.Array:
    """uint32 words [..., D/4] -> int8 [..., D] in channel order."""
    return jax.lax.bitcast_convert_type(_unpack_quarters(q, 8).astype(jnp.uint8), jnp.int8)


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (q uint32 [..., D/4], scale fp16 [...]): symmetric, absmax / 127."""
    x32 = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x32), axis=-1) * INV127).astype(SCALE_DTYPE)  # [...]
    n = jnp.round(x32 * reciprocal_fp16(scale)[..., None])
    return pack_int8(jnp.clip(n, -127, 127).astype(jnp.int8)), scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (unpack_int8(q).astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


def pack_int4(n: jax.Array) -> jax.Array:
    """Nibbles (0..15, any integer dtype) [..., D] -> uint16 words [..., D/4]: nibble e of
    word j is channel j + e * D/4."""
    return _pack_quarters(n, 4, jnp.uint16)


def quantize_int4(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [..., D] -> (q uint16 [..., D/4], scale, zero fp16 [..., D/group]): asymmetric."""
    *lead, d = x.shape
    g = x.astype(jnp.float32).reshape(*lead, d // group, group)  # [..., N, group]
    lo, hi = jnp.min(g, axis=-1), jnp.max(g, axis=-1)  # [..., N]
    zero = lo.astype(SCALE_DTYPE)
    scale = ((hi - lo) * INV15).astype(SCALE_DTYPE)
    n = jnp.round((g - fp16_to_f32(zero)[..., None]) * reciprocal_fp16(scale)[..., None])
    n = jnp.clip(n, 0, 15).astype(jnp.uint8).reshape(*lead, d)  # [..., D]
    return pack_int4(n), scale, zero


def unpack_int4(q: jax.Array) -> jax.Array:
    """q uint16 [..., D/4] -> nibbles uint8 [..., D] in channel order."""
    return _unpack_quarters(q, 4).astype(jnp.uint8)


def dequantize_int4(q: jax.Array, scale: jax.Array, zero: jax.Array, dtype) -> jax.Array:
    n = unpack_int4(q).astype(jnp.float32)  # [..., D]
    *lead, d = n.shape
    groups = scale.shape[-1]
    n = n.reshape(*lead, groups, d // groups)
    x = n * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]
    return x.reshape(*lead, d).astype(dtype)


def empty_store(kind: str, shape: tuple[int, ...], group: int, dtype=jnp.bfloat16) -> Store:
    """An all-zero store of `kind` for values of `shape` [B, S, K, D] (its arrays in the
    store's layout: quantized ones head-major); `dtype` is the full-precision dtype (Kivi4's
    residual)."""
    d = shape[-1]
    if kind in QUANTIZED and d % 4:
        raise ValueError(f"{kind} stores pack the four quarters of head_dim into words: head_dim {d} is not a "
                         "multiple of 4")
    b, s, k, _ = shape
    if kind == "kivi4":
        return Kivi4(
            jnp.zeros((b, k, s, d // 4), jnp.uint16),
            jnp.zeros((b, k, s // group, 2, d), SCALE_DTYPE),
            jnp.zeros((b, k, group, d), dtype),
            jnp.zeros((b,), jnp.int32),
        )
    group = min(group, d)
    if kind in DENSE_DTYPES:
        return Dense(jnp.zeros(shape, DENSE_DTYPES[kind]))
    lead = (b, k, s)  # head-major
    if kind == "int8":
        return Int8(jnp.zeros((*lead, d // 4), jnp.uint32), jnp.zeros(lead, SCALE_DTYPE))
    return Int4(jnp.zeros((*lead, d // 4), jnp.uint16), jnp.zeros((*lead, d // group, 2), SCALE_DTYPE))


def head_dim(store: Store) -> int:
    """D of the values a store holds: its data's last axis, times 4 for packed words."""
    data = jax.tree.leaves(store)[0]  # x, or the packed q
    return data.shape[-1] * (1 if isinstance(store, Dense) else 4)


def _quantize_tokens(store: Int8 | Int4, x: jax.Array) -> tuple[jax.Array, ...]:
    """x [B, T, K, D] -> the store format's arrays, token-major ([B, T, K, ...])."""
    if isinstance(store, Int8):
        return quantize_int8(x)
    q, scale, zero = quantize_int4(x, store.group)
    return q, jnp.stack([scale, zero], axis=-1)


def encode(store: Store, x: jax.Array) -> Store:
    """New values x [B, T, K, D] in the format of `store` (a store of T slots; Kivi4: T a
    multiple of its group, every group quantized)."""
    if isinstance(store, Dense):
        return Dense(x.astype(store.x.dtype))
    if isinstance(store, Kivi4):
        b, t = x.shape[:2]
        empty = empty_store("kivi4", x.shape, store.group, store.residual.dtype)
        return _kivi_write(empty, x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    return type(store)(*(jnp.swapaxes(a, 1, 2) for a in _quantize_tokens(store, x)))


def decode_store(store: Store, dtype) -> jax.Array:
    """The store's values as a dense [B, S, K, D] array of `dtype` (token-major)."""
    if isinstance(store, Dense):
        return store.x.astype(dtype)
    if isinstance(store, Int8):
        x = dequantize_int8(store.q, store.scale, dtype)
    elif isinstance(store, Int4):
        x = dequantize_int4(store.q, store.scale, store.zero, dtype)
    else:
        x = _kivi_decode(store, dtype)
    return jnp.swapaxes(x, 1, 2)  # [B, K, S, D] -> [B, S, K, D]


def _kivi_dequantize(store: Kivi4, dtype) -> jax.Array:
    """The quantized part of a Kivi4 store, all S slots: [B, K, S, D]."""
    g = store.group
    scale = jnp.repeat(store.scale.astype(jnp.float32), g, axis=2)  # [B, K, S, D]
    zero = jnp.repeat(store.zero.astype(jnp.float32), g, axis=2)
    return (unpack_int4(store.q).astype(jnp.float32) * scale + zero).astype(dtype)


def _kivi_decode(store: Kivi4, dtype) -> jax.Array:
    """All S slots of a Kivi4 store, head-major [B, K, S, D]: the residual's where it holds them."""
    s = store.q.shape[2]
    pos = jnp.arange(s)[None, :]  # [1, S]
    in_residual = (pos >= store.flushed[:, None]) & (pos < store.flushed[:, None] + store.group)  # [B, S]
    residual = jnp.take(store.residual, pos[0] % store.group, axis=2).astype(dtype)  # [B, K, S, D]
    return jnp.where(in_residual[:, None, :, None], residual, _kivi_dequantize(store, dtype))


def _kivi_write(store: Kivi4, x: jax.Array, positions: jax.Array) -> Kivi4:
    """Appends x [B, T, K, D] at positions start + t (t < count; the rest -1) of each row.

    The tokens of the group holding `start` that precede it (from the residual, or from
    the quantized store after a roll-back) and the new tokens form a window of whole
    groups; complete groups are quantized per channel and stored, the last incomplete
    group becomes the residual.
    """
    b, t, _, _ = x.shape
    g, s = store.group, store.q.shape[2]
    count = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)  # [B]
    start = jnp.where(count > 0, positions[:, 0], store.flushed)  # [B]
    base = (start // g) * g  # [B] first position of the window
    width = -(-(g - 1 + t) // g) * g  # W, whole groups covering [base, start + T): start - base < g
    w_pos = base[:, None] + jnp.arange(width)[None, :]  # [B, W]
    rows = jnp.arange(b)[:, None]

    new_idx = w_pos - start[:, None]
    from_new = (new_idx >= 0) & (new_idx < count[:, None])  # [B, W]
    new_vals = x[rows, jnp.clip(new_idx, 0, t - 1)].astype(jnp.float32)  # [B, W, K, D]
    from_res = (w_pos >= store.flushed[:, None]) & ~from_new
    # Head-major arrays indexed [rows, :, slots] give token-major [B, W, K, ...] (numpy's rule
    # for advanced indices split by a slice), as are the window and what is set below.
    res_vals = store.residual[rows, :, w_pos % g].astype(jnp.float32)
    stored = _kivi_dequantize(store, jnp.float32)[rows, :, jnp.clip(w_pos, 0, s - 1)]  # roll-back case
    window = jnp.where(from_new[..., None, None], new_vals, jnp.where(from_res[..., None, None], res_vals, stored))

    *_, k, d = window.shape
    groups = window.reshape(b, width // g, g, k, d)  # [B, W/g, g, K, D]
    lo, hi = jnp.min(groups, axis=2), jnp.max(groups, axis=2)  # [B, W/g, K, D]
    zero = lo.astype(SCALE_DTYPE)
    scale = ((hi - lo) * INV15).astype(SCALE_DTYPE)
    n = jnp.round((groups - fp16_to_f32(zero)[:, :, None]) * reciprocal_fp16(scale)[:, :, None])
    packed = pack_int4(jnp.clip(n, 0, 15).astype(jnp.uint8).reshape(b, width, k, d))  # [B, W, K, D/4]

    new_len = start + count  # [B]
    flushed = (new_len // g) * g
    group_end = base[:, None] + g * (jnp.arange(width // g)[None, :] + 1)  # [B, W/g]
    complete = group_end <= new_len[:, None]
    tok_slots = jnp.where(jnp.repeat(complete, g, axis=1) & (w_pos < s), w_pos, s)  # drop the rest
    grp_slots = jnp.where(complete, group_end // g - 1, s // g)
    keep = count == 0  # rows with nothing to write keep their residual
    # The group holding flushed; when the window ends exactly at flushed, no position of the
    # new residual is written yet and the last group stands in (never read).
    open_group = jnp.minimum((flushed - base) // g, width // g - 1)
    residual = jnp.take_along_axis(groups, open_group[:, None, None, None, None], axis=1)[:, 0]  # [B, g, K, D]
    residual = jnp.swapaxes(residual, 1, 2).astype(store.residual.dtype)  # [B, K, g, D]
    return Kivi4(
        q=store.q.at[rows, :, tok_slots].set(packed, mode="drop"),
        scale_zero=store.scale_zero.at[rows, :, grp_slots].set(jnp.stack([scale, zero], axis=-2), mode="drop"),
        residual=jnp.where(keep[:, None, None, None], store.residual, residual),
        flushed=jnp.where(keep, store.flushed, flushed),
    )


# ------------------------------------------------------------------------------- cache


@struct.dataclass
class LayerCache:
    """One layer's keys and values, each in its own store (see the module docstring)."""

    k: Store
    v: Store

    @property
    def max_len(self) -> int:
        return dims(self.k)[1]


@struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    lengths: jax.Array  # [B] int32: valid (written) tokens per sequence

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def create(cfg: ModelConfig, batch: int, max_len: int, kv_format: str | None = None) -> KVCache:
    """An empty cache of `max_len` slots per sequence (all lengths 0)."""
    fmt = parse_format(resolve_format(cfg, kv_format))
    if "kivi4" in (fmt.k, fmt.v):  # whole token groups
        max_len = -(-max_len // fmt.group) * fmt.group
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)  # [B, S, K, D]
    dtype = jnp.dtype(cfg.dtype)
    layers = tuple(
        LayerCache(k=empty_store(fmt.k, shape, fmt.group, dtype), v=empty_store(fmt.v, shape, fmt.group, dtype))
        for _ in range(cfg.num_layers)
    )
    return KVCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def bytes_per_token_per_layer(cfg: ModelConfig, kv_format: str | None = None) -> int | float:
    """Bytes each further token adds to one layer's cache, K and V, scales and zeros included.

    Measured on the cache itself: its growth from S to 2S slots, divided by S, so parts
    fixed per sequence (kivi4's full-precision residual group) are not counted per token.
    An int where the count is whole (a float where a kivi4 scale is shared by g tokens).
    """
    def size(slots: int) -> int:
        cache = jax.eval_shape(lambda: create(cfg, 1, slots, kv_format))
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache.layers[0]))

    slots = 2 * max(INT4_GROUPS)  # a multiple of every token group
    per_token = (size(2 * slots) - size(slots)) / slots
    return int(per_token) if per_token == int(per_token) else per_token


def bytes_per_token(cfg: ModelConfig, kv_format: str | None = None) -> int | float:
    """Bytes each further token adds to the cache, over all layers (K and V)."""
    return cfg.num_layers * bytes_per_token_per_layer(cfg, kv_format)


def _kernel_writes(impl: str, *stores: Store) -> bool:
    """Whether the Pallas quantize-and-append kernel writes these stores. Under "auto",
    dense stores stay with XLA: its scatter fuses with the RoPE that makes k, one kernel
    fewer per layer in decode (measured on an H200; see bench/README.md)."""
    dense = any(isinstance(st, Dense) for st in stores)
    return impl == "pallas" or (impl == "auto" and on_gpu() and (KERNEL_WRITES_DENSE or not dense))


def _append_range(positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(start [B], count [B]) of rows whose valid positions are start, start + 1, ... first."""
    count = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)
    return jnp.where(count > 0, positions[:, 0], 0), count


def _write_store(store: Store, x: jax.Array, positions: jax.Array, impl: str) -> Store:
    """Encodes x [B, T, K, D] and writes it at [row, position]; padding is dropped."""
    if isinstance(store, Kivi4):
        return _kivi_write(store, x, positions)
    if _kernel_writes(impl, store):
        from pallas_kernels import quantize_append  # the kernels import this module

        return quantize_append.quantize_append(store, x, *_append_range(positions), interpret=not on_gpu())
    max_len = dims(store)[1]
    # Padding and positions past the end go to index S, which mode="drop" discards.
    slots = jnp.where((positions >= 0) & (positions < max_len), positions, max_len)  # [B, T]
    rows = jnp.arange(x.shape[0])[:, None]  # [B, 1]
    if isinstance(store, Dense):
        return Dense(store.x.at[rows, slots].set(x.astype(store.x.dtype), mode="drop"))
    # Head-major arrays set at [rows, :, slots] take token-major values [B, T, K, ...].
    new = _quantize_tokens(store, x)
    return type(store)(*(old.at[rows, :, slots].set(a, mode="drop") for old, a in zip(jax.tree.leaves(store), new)))


def write(
    layer: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array, *, impl: str = "auto"
) -> LayerCache:
    """Quantizes (if the format does) and stores new keys/values at their positions.

    Args:
      layer: the layer's cache.
      k, v: [B, T, K, D] new keys and values (RoPE already applied to k).
      positions: [B, T] int32 absolute positions; -1 marks padding (not written). A
        kivi4 store (and the GPU append kernel) needs each row's valid positions to be
        consecutive and first: start, start + 1, ..., then -1s (as prefill and decode do).
      impl: "auto" (the fused Pallas quantize-and-append kernel on a GPU, XLA's scatter
        on the CPU; dense stores stay with XLA, see `_kernel_writes`), "xla" or "pallas"
        (interpret mode off the GPU). The kernel writes K and V in one launch unless a
        side is kivi4.
    """
    fused = not isinstance(layer.k, Kivi4) and not isinstance(layer.v, Kivi4) and k.shape == v.shape
    if fused and _kernel_writes(impl, layer.k, layer.v):
        from pallas_kernels import quantize_append  # the kernels import this module

        k_store, v_store = quantize_append.quantize_append_kv(layer.k, layer.v, k, v, *_append_range(positions),
                                                              interpret=not on_gpu())
        return LayerCache(k=k_store, v=v_store)
    return LayerCache(k=_write_store(layer.k, k, positions, impl), v=_write_store(layer.v, v, positions, impl))


def read(layer: LayerCache, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Keys and values as dense [B, S, K, D] arrays (slot s holds position s).

    `dtype` is the dequantized dtype (default: a dense store's own dtype, else bf16).
    """
    if dtype is None:
        dtype = layer.k.x.dtype if isinstance(layer.k, Dense) else jnp.bfloat16
    return decode_store(layer.k, dtype), decode_store(layer.v, dtype)


def advance(cache: KVCache, layers: tuple[LayerCache, ...], positions: jax.Array) -> KVCache:
    """The cache with new layers and lengths grown to cover the positions written."""
    written = jnp.max(jnp.where(positions >= 0, positions + 1, 0), axis=1)  # [B]
    return KVCache(layers=tuple(layers), lengths=jnp.maximum(cache.lengths, written.astype(jnp.int32)))


def set_lengths(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Rolls lengths back (or forward) without touching the stored data: slots past a
    sequence's length are ignored by attention and overwritten by later writes."""
    return cache.replace(lengths=lengths.astype(jnp.int32))
