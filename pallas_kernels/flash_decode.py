"""Split-K flash-decode attention over a dense, int8 or int4 KV cache (Pallas, Triton).

One query token per sequence attends over its sequence's cache slots. K and V are read
in their storage format (`ollm_jax.kv_cache` stores: Dense, Int8, Int4, possibly a
different one for K and for V) and dequantized in registers:

- int8: scores = (q . k_q) * scale; the V scale multiplies the probabilities.
- int4: nibbles unpacked with shifts into the low half (channels [0, D/2)) and the high
  half ([D/2, D)) of head_dim, one dot per quantization group; scores
  = sum_n scale_n * (q_n . nibbles_n) + zero_n * sum(q_n), and for V the group scale
  multiplies the probabilities and the zero point adds sum(p * zero_n) per group.

Grid (B, K, P): one program per sequence, KV head and split. All G query heads of a KV
head share one read of each K/V tile (their rows are padded to a dot-friendly Gp >= 16).
A program walks only the key blocks its sequence can see (a loop bound computed from
the query position), so an 8k context in a 128k cache reads 8k slots; the visible
blocks are dealt out evenly to the P splits. `combine_splits` merges the P partial
softmaxes.

Dimensions: B batch, S cache slots (slot s holds position s), H query heads, K KV heads,
G = H // K query heads per KV head, Gp G padded to a power of two >= 16, D head_dim,
N = D / group int4 quantization groups, P splits of the visible key range, Ts keys per
block (`block_s`), C = min(group, D/2) int4 channels per unpacked chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

import pallas_kernels  # noqa: F401  (filters the Triton deprecation warning)
from ollm_jax import attention, kv_cache
from ollm_jax.kv_cache import Dense, Int4, Int8, Store

NUM_SMS = 132  # H100 and H200: the grid is sized to cover this many SMs several times
PROGRAMS_PER_SM = 4  # target programs in flight per SM when choosing num_splits
MIN_BLOCKS_PER_SPLIT = 2  # at the longest context, each split walks at least this many blocks
Q_DTYPES = (jnp.bfloat16, jnp.float16)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: empty splits and rows stay NaN-free


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kind(store: Store) -> str:
    if isinstance(store, Dense):
        return "dense"
    if isinstance(store, Int8):
        return "int8"
    if isinstance(store, Int4):
        return "int4"
    raise TypeError(f"expected a kv_cache store (Dense, Int8, Int4), got {type(store).__name__}")


def _store_arrays(store: Store) -> tuple[jax.Array, ...]:
    return tuple(jax.tree.leaves(store))  # Dense: (x,); Int8: (q, scale); Int4: (q, scale, zero)


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class Config:
    block_s: int
    num_splits: int
    num_warps: int
    num_stages: int


def default_num_splits(batch: int, kv_heads: int, max_len: int, block_s: int) -> int:
    """Splits so that B * K * P programs cover the 132 SMs about PROGRAMS_PER_SM times,
    but no more than leave each split MIN_BLOCKS_PER_SPLIT blocks of a full cache."""
    want = pl.cdiv(NUM_SMS * PROGRAMS_PER_SM, batch * kv_heads)
    most = max(1, max_len // (MIN_BLOCKS_PER_SPLIT * block_s))
    return max(1, min(want, most))


def default_config(k_kind: str, v_kind: str, batch: int, kv_heads: int, max_len: int) -> Config:
    """Defaults per format: int4 tiles are 4x (int8 2x) fewer bytes than bf16 ones, so
    quantized caches take longer blocks to keep as many bytes in flight per step."""
    kinds = {k_kind, v_kind}
    block_s = 256 if kinds == {"int4"} else 128
    block_s = min(block_s, max(16, _pow2_ceil(max_len)))
    return Config(
        block_s=block_s,
        num_splits=default_num_splits(batch, kv_heads, max_len, block_s),
        num_warps=4,
        num_stages=2,
    )


# ------------------------------------------------------------------------------ kernel


def _flash_decode_kernel(
    pos_ref,  # [1] int32: this sequence's query position (-1: padding)
    q_ref,  # [Gp, D] rows >= G are outside q (masked)
    *refs,  # K store refs, V store refs, then o_ref [Gp, D] f32, m_ref [Gp], l_ref [Gp]
    k_kind: str,
    v_kind: str,
    num_heads_per_kv: int,  # G
    max_len: int,  # S
    block_s: int,  # Ts
    num_splits: int,  # P
    sliding_window: int | None,
    sm_scale: float,
):
    n_k = {"dense": 1, "int8": 2, "int4": 3}[k_kind]
    n_v = {"dense": 1, "int8": 2, "int4": 3}[v_kind]
    k_refs, v_refs = refs[:n_k], refs[n_k : n_k + n_v]
    o_ref, m_ref, l_ref = refs[n_k + n_v :]
    split = pl.program_id(2)  # read at the top level (interpret mode needs it here)
    gp, d = q_ref.shape
    half = d // 2
    dt = q_ref.dtype
    f32 = jnp.float32

    # Rows >= G of the q block lie outside q: masked to zero on load and on store.
    row_mask = None if gp == num_heads_per_kv else (jnp.arange(gp) < num_heads_per_kv)[:, None]  # [Gp, 1]

    def load_q(cols):
        return plt.load(q_ref.at[:, cols], mask=row_mask, other=0) if row_mask is not None else q_ref[:, cols]

    # The visible slots [lo, hi) and the blocks this split walks.
    pos = pos_ref[0]
    hi = jnp.minimum(pos + 1, max_len)  # pos = -1 (padding) -> hi = 0 -> no block
    lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos + 1 - sliding_window, 0)
    first_block = lax.div(lo, block_s)
    n_blocks = jnp.maximum(lax.div(hi + block_s - 1, block_s) - first_block, 0)
    per_split = lax.div(n_blocks + num_splits - 1, num_splits)
    start_block = first_block + split * per_split
    count = jnp.clip(n_blocks - split * per_split, 0, per_split)

    # ---- K side: scores [Gp, Ts] f32, already times sm_scale.
    if k_kind == "int4":
        k_group = 2 * k_refs[0].shape[-1] // k_refs[1].shape[-1]
        k_chunk = min(k_group, half)  # C
        k_n = d // k_group  # N
        # Query columns of each chunk: the low nibbles of packed columns [c*C, (c+1)*C)
        # are channels c*C.., the high nibbles channels D/2 + c*C.. .
        q_lo = [load_q(pl.ds(c * k_chunk, k_chunk)) for c in range(half // k_chunk)]  # [Gp, C] each
        q_hi = [load_q(pl.ds(half + c * k_chunk, k_chunk)) for c in range(half // k_chunk)]
        # sum(q) per group, for the zero point term; f32 [Gp] each.
        q_sum = [jnp.zeros((gp,), f32) for _ in range(k_n)]
        for c in range(half // k_chunk):
            q_sum[c * k_chunk // k_group] += jnp.sum(q_lo[c].astype(f32), axis=1)
            q_sum[(half + c * k_chunk) // k_group] += jnp.sum(q_hi[c].astype(f32), axis=1)
        q_sum = [x * sm_scale for x in q_sum]
    else:
        q = load_q(slice(None))  # [Gp, D]

    def k_scores(rows, visible):
        vis2 = visible[:, None]  # [Ts, 1]
        if k_kind == "dense":
            k = plt.load(k_refs[0].at[rows, :], mask=vis2, other=0).astype(dt)  # [Ts, D]
            return jnp.dot(q, k.T, preferred_element_type=f32) * sm_scale  # [Gp, Ts]
        if k_kind == "int8":
            k = plt.load(k_refs[0].at[rows, :], mask=vis2, other=0).astype(dt)  # [Ts, D] int8 -> dt, exact
            scale = plt.load(k_refs[1].at[rows], mask=visible, other=0).astype(f32) * sm_scale  # [Ts]
            return jnp.dot(q, k.T, preferred_element_type=f32) * scale[None, :]  # [Gp, Ts]
        kq_ref, ks_ref, kz_ref = k_refs  # [S, D/2] uint8, [S, N], [S, N]
        dots = [None] * k_n  # per group: q_n . nibbles_n, [Gp, Ts] f32
        for c in range(half // k_chunk):
            packed = plt.load(kq_ref.at[rows, pl.ds(c * k_chunk, k_chunk)], mask=vis2, other=0)  # [Ts, C] uint8
            # Nibbles 0..15 are exact in bf16/fp16; via int8, whose conversion Triton vectorizes.
            n_lo = (packed & 0xF).astype(jnp.int8).astype(dt)  # [Ts, C]
            n_hi = (packed >> 4).astype(jnp.int8).astype(dt)  # [Ts, C]
            for n, part in (
                (c * k_chunk // k_group, jnp.dot(q_lo[c], n_lo.T, preferred_element_type=f32)),
                ((half + c * k_chunk) // k_group, jnp.dot(q_hi[c], n_hi.T, preferred_element_type=f32)),
            ):
                dots[n] = part if dots[n] is None else dots[n] + part
        s = None
        for n in range(k_n):
            scale = plt.load(ks_ref.at[rows, jnp.int32(n)], mask=visible, other=0).astype(f32) * sm_scale  # [Ts]
            zero = plt.load(kz_ref.at[rows, jnp.int32(n)], mask=visible, other=0).astype(f32)  # [Ts]
            term = dots[n] * scale[None, :] + q_sum[n][:, None] * zero[None, :]  # [Gp, Ts]
            s = term if s is None else s + term
        return s

    # ---- V side: accumulators (unnormalized, f32) and their update.
    if v_kind == "int4":
        v_group = 2 * v_refs[0].shape[-1] // v_refs[1].shape[-1]
        v_chunk = min(v_group, half)
        v_n = d // v_group
        v_chunks = half // v_chunk
        # acc: low-half chunks [Gp, C] * v_chunks, high-half chunks likewise, then sum(p * zero_n) [Gp] * N.
        acc0 = (
            tuple(jnp.zeros((gp, v_chunk), f32) for _ in range(2 * v_chunks))
            + tuple(jnp.zeros((gp,), f32) for _ in range(v_n))
        )
    else:
        acc0 = (jnp.zeros((gp, d), f32),)

    def v_accumulate(rows, visible, p, acc):
        vis2 = visible[:, None]  # [Ts, 1]
        if v_kind == "dense":
            v = plt.load(v_refs[0].at[rows, :], mask=vis2, other=0).astype(dt)  # [Ts, D]
            return (acc[0] + jnp.dot(p.astype(dt), v, preferred_element_type=f32),)
        if v_kind == "int8":
            v = plt.load(v_refs[0].at[rows, :], mask=vis2, other=0).astype(dt)  # [Ts, D]
            scale = plt.load(v_refs[1].at[rows], mask=visible, other=0).astype(f32)  # [Ts]
            p_scaled = (p * scale[None, :]).astype(dt)  # [Gp, Ts]
            return (acc[0] + jnp.dot(p_scaled, v, preferred_element_type=f32),)
        vq_ref, vs_ref, vz_ref = v_refs  # [S, D/2] uint8, [S, N], [S, N]
        p_scaled, z_acc = [], list(acc[2 * v_chunks :])
        for n in range(v_n):
            scale = plt.load(vs_ref.at[rows, jnp.int32(n)], mask=visible, other=0).astype(f32)  # [Ts]
            zero = plt.load(vz_ref.at[rows, jnp.int32(n)], mask=visible, other=0).astype(f32)  # [Ts]
            p_scaled.append((p * scale[None, :]).astype(dt))  # [Gp, Ts]
            z_acc[n] = z_acc[n] + jnp.sum(p * zero[None, :], axis=1)  # [Gp]
        out = list(acc[: 2 * v_chunks])
        for c in range(v_chunks):
            packed = plt.load(vq_ref.at[rows, pl.ds(c * v_chunk, v_chunk)], mask=vis2, other=0)  # [Ts, C] uint8
            n_lo = (packed & 0xF).astype(jnp.int8).astype(dt)  # [Ts, C]
            n_hi = (packed >> 4).astype(jnp.int8).astype(dt)
            out[c] += jnp.dot(p_scaled[c * v_chunk // v_group], n_lo, preferred_element_type=f32)
            out[v_chunks + c] += jnp.dot(p_scaled[(half + c * v_chunk) // v_group], n_hi, preferred_element_type=f32)
        return tuple(out) + tuple(z_acc)

    def body(i, carry):
        m_prev, l_prev, acc = carry  # [Gp], [Gp], accumulators
        t0 = (start_block + i) * block_s
        rows = pl.ds(t0, block_s)
        slots = t0 + jnp.arange(block_s)  # [Ts]
        visible = (slots >= lo) & (slots < hi)  # [Ts]; every walked block has a visible slot
        s = jnp.where(visible[None, :], k_scores(rows, visible), _MASKED)  # [Gp, Ts]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # [Gp]
        correction = jnp.exp(m_prev - m_next)  # [Gp]
        p = jnp.exp(s - m_next[:, None])  # [Gp, Ts] f32
        l_next = l_prev * correction + jnp.sum(p, axis=1)
        acc = tuple(a * (correction[:, None] if a.ndim == 2 else correction) for a in acc)
        return m_next, l_next, v_accumulate(rows, visible, p, acc)

    m0 = jnp.full((gp,), _MASKED, f32)
    l0 = jnp.zeros((gp,), f32)
    m, l, acc = lax.fori_loop(0, count, body, (m0, l0, acc0))

    def store(ref, cols, x):
        if row_mask is None:
            ref[:, cols] = x
        else:
            plt.store(ref.at[:, cols], x, mask=row_mask)

    if v_kind == "int4":
        for c in range(v_chunks):
            for col, a in ((c * v_chunk, acc[c]), (half + c * v_chunk, acc[v_chunks + c])):
                z = acc[2 * v_chunks + col // v_group]  # [Gp]: sum(p * zero) of this chunk's group
                store(o_ref, pl.ds(col, v_chunk), a + z[:, None])  # [Gp, C]
    else:
        store(o_ref, slice(None), acc[0])  # [Gp, D]
    vec_mask = None if row_mask is None else row_mask[:, 0]
    plt.store(m_ref, m, mask=vec_mask)
    plt.store(l_ref, l, mask=vec_mask)


# ----------------------------------------------------------------------------- wrapper


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges P partial softmaxes. o [B, K, P, G, D] unnormalized, m and l [B, K, P, G]
    (running max and sum of exp); returns [B, K, G, D] f32. A row no split saw (padding)
    gets 0, not NaN."""
    m_max = jnp.max(m, axis=2, keepdims=True)  # [B, K, 1, G]
    # jax's own decode kernel needs this barrier to avoid NaNs after fusion (b/389925439).
    m_max = lax.optimization_barrier(m_max)
    w = jnp.exp(m - m_max)  # [B, K, P, G]
    l_sum = jnp.sum(w * l, axis=2)  # [B, K, G]
    o_sum = jnp.sum(w[..., None] * o, axis=2)  # [B, K, G, D]
    return o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]


def _check(q, k: Store, v: Store, q_positions, sliding_window) -> tuple[str, str]:
    if q.ndim != 3:
        raise ValueError(f"q must be [B, H, D], got {q.shape=}")
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be bfloat16 or float16, got {q.dtype=}")
    k_kind, v_kind = _kind(k), _kind(v)
    b, h, d = q.shape
    shapes = {}
    for name, store, kind in (("k", k, k_kind), ("v", v, v_kind)):
        data = _store_arrays(store)[0]
        if data.ndim != 4:
            raise ValueError(f"{name} store data must be [B, S, K, D or D/2], got {data.shape=}")
        width = data.shape[-1] * (2 if kind == "int4" else 1)
        shapes[name] = (*data.shape[:3], width)
        if kind == "dense" and data.dtype not in Q_DTYPES:
            raise ValueError(f"dense {name} must be bfloat16 or float16, got {data.dtype=}")
        if kind == "int4":
            group = store.group
            if 2 * data.shape[-1] % store.scale.shape[-1] or min(group, d // 2) < 16:
                raise ValueError(f"{name}: int4 group {group} unsupported for head_dim {d}")
    if shapes["k"] != shapes["v"]:
        raise ValueError(f"k and v stores hold different shapes: {shapes['k']=} vs {shapes['v']=}")
    kb, s, kh, kd = shapes["k"]
    if kb != b or kd != d:
        raise ValueError(f"q {q.shape=} does not match the cache [B, S, K, D] = {shapes['k']}")
    if h % kh:
        raise ValueError(f"query heads {h} not a multiple of KV heads {kh}")
    if d & (d - 1) or not 32 <= d <= 256:
        raise ValueError(f"head_dim {d} unsupported: a power of two in [32, 256]")
    if q_positions.shape != (b,):
        raise ValueError(f"q_positions must be [B] = ({b},), got {q_positions.shape=}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be >= 1 or None")
    return k_kind, v_kind


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "block_s", "num_splits", "num_warps", "num_stages", "interpret"),
)
def flash_decode(
    q: jax.Array,
    k: Store,
    v: Store,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    block_s: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of one query token per sequence over its KV cache.

    Args:
      q: [B, H, D] bf16/fp16, RoPE applied.
      k, v: kv_cache stores (Dense bf16/fp16, Int8, Int4), data [B, S, K, D(/2)];
        slot s holds position s. K and V may be in different formats.
      q_positions: [B] int32; the query at p sees slots s <= p (and s > p -
        sliding_window); -1 marks a padding row (finite output, value unused).
      sliding_window: None (all) or the window length.
      block_s, num_splits, num_warps, num_stages: tuning knobs; None picks
        `default_config` (num_splits from B, K and S to fill 132 SMs).
      interpret: run the kernel in Pallas interpret mode (CPU tests).
    Returns:
      [B, H, D] in q's dtype.
    """
    k_kind, v_kind = _check(q, k, v, q_positions, sliding_window)
    b, h, d = q.shape
    _, s, kv_heads, _ = _store_arrays(k)[0].shape
    g = h // kv_heads
    gp = max(16, _pow2_ceil(g))
    cfg = default_config(k_kind, v_kind, b, kv_heads, s)
    block_s = block_s or cfg.block_s
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"{block_s=} must be a power of two >= 16")
    num_splits = num_splits or default_num_splits(b, kv_heads, s, block_s)
    num_warps = num_warps or cfg.num_warps
    num_stages = num_stages or cfg.num_stages

    def cache_spec(x):
        # The whole cache row of one (sequence, KV head); the kernel slices its blocks.
        if x.ndim == 3:  # int8 scale [B, S, K]
            return pl.BlockSpec((None, s, None), lambda bi, ki, pi: (bi, 0, ki))
        return pl.BlockSpec((None, s, None, x.shape[-1]), lambda bi, ki, pi: (bi, 0, ki, 0))

    k_arrays, v_arrays = _store_arrays(k), _store_arrays(v)
    kernel = functools.partial(
        _flash_decode_kernel,
        k_kind=k_kind,
        v_kind=v_kind,
        num_heads_per_kv=g,
        max_len=s,
        block_s=block_s,
        num_splits=num_splits,
        sliding_window=sliding_window,
        sm_scale=d**-0.5,
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda bi, ki, pi: (bi,)),
            pl.BlockSpec((None, None, gp, d), lambda bi, ki, pi: (bi, ki, 0, 0)),
            *[cache_spec(x) for x in (*k_arrays, *v_arrays)],
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda bi, ki, pi: (bi, ki, pi, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, pi: (bi, ki, pi, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, pi: (bi, ki, pi, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, g, d), jnp.float32),  # o, unnormalized
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, g), jnp.float32),  # m
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, g), jnp.float32),  # l
        ],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"flash_decode_k{k_kind}_v{v_kind}",
    )(q_positions.astype(jnp.int32), q.reshape(b, kv_heads, g, d), *k_arrays, *v_arrays)
    return combine_splits(o, m, l).reshape(b, h, d).astype(q.dtype)


def flash_decode_reference(
    q: jax.Array, k: Store, v: Store, q_positions: jax.Array, *, sliding_window: int | None = None
) -> jax.Array:
    """Plain-JAX twin of `flash_decode`: dequantize to q's dtype, then
    `attention.attention_reference` with T = 1. With a float32 q it is the exact oracle
    (float32 dequantization and softmax throughout). Returns [B, H, D] in q's dtype."""
    k_dense = kv_cache.decode_store(k, q.dtype)  # [B, S, K, D]
    v_dense = kv_cache.decode_store(v, q.dtype)
    out = attention.attention_reference(
        q[:, None], k_dense, v_dense, q_positions[:, None], sliding_window=sliding_window
    )  # [B, 1, H, D]
    return out[:, 0]


# ------------------------------------------------------------------------------- bench


def _random_store(key, kind: str, shape: tuple[int, ...], group: int) -> Store:
    """Random store values of `kind` for [B, S, K, D] (speed does not depend on values)."""
    *lead, d = shape
    k1, k2, k3 = jax.random.split(key, 3)
    if kind == "bf16":
        return Dense(jax.random.normal(k1, shape, jnp.bfloat16))
    if kind == "int8":
        q = jax.random.randint(k1, shape, -127, 128, jnp.int8)
        return Int8(q, jax.random.uniform(k2, lead, jnp.float16, 0.005, 0.02))
    n = d // group
    return Int4(
        jax.random.bits(k1, (*lead, d // 2), jnp.uint8),
        jax.random.uniform(k2, (*lead, n), jnp.float16, 0.01, 0.2),
        jax.random.uniform(k3, (*lead, n), jnp.float16, -1.5, -0.5),
    )


def _bench(fn, args_list, samples: int) -> float:
    """Median seconds per call of `fn` over the argument tuples in args_list, run
    back-to-back in one jitted program (distinct inputs: nothing is CSE'd, and cycling
    caches larger than L2 keeps repeated runs from hitting L2); one warm-up call."""
    many = jax.jit(lambda all_args: [fn(*a) for a in all_args])
    jax.block_until_ready(many(args_list))
    times = []
    import time

    for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready(many(args_list))
        times.append((time.perf_counter() - t0) / len(args_list))
    return sorted(times)[len(times) // 2]


def _csv_ints(text: str | None) -> list[int | None]:
    return [None] if text is None else [int(x) for x in text.split(",")]


def main(argv=None) -> None:
    import argparse
    import gc
    import itertools
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import common

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="1,8")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--formats", default="bf16,int8,int4", help="kv_cache format names, e.g. bf16,int8,int4-g32,k8v4")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-s", help="comma list: sweeps the product of all knob lists")
    p.add_argument("--num-splits")
    p.add_argument("--num-warps")
    p.add_argument("--num-stages")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--calls", type=int, default=16, help="kernel calls per timed sample (amortizes dispatch)")
    p.add_argument("--no-reference", action="store_true", help="skip XLA's reference timing")
    args = p.parse_args(argv)

    env = common.environment()
    common.print_environment(env)
    copy_bw = common.jax_copy_bandwidth(1 << 30)
    print(f"ceiling     jax copy (x+1) of 1 GiB, read+write: {copy_bw / 1e9:.0f} GB/s on {env['jax_device_kind']}")
    knobs = list(itertools.product(*map(_csv_ints, (args.block_s, args.num_splits, args.num_warps, args.num_stages))))
    headers = ["B", "L", "format", "block_s", "splits", "warps", "stages", "us", "GB/s", "% copy", "XLA us",
               "XLA GB/s", "x XLA", "max |err|"]
    rows = []
    key = jax.random.key(0)
    h, kh, d = args.heads, args.kv_heads, args.head_dim
    for b, length, fmt_name in itertools.product(_csv_ints(args.batch), _csv_ints(args.lengths), args.formats.split(",")):
        fmt = kv_cache.parse_format(fmt_name)
        group = min(fmt.group, d)
        shape = (b, length, kh, d)
        one_bytes = 0
        kinds = {"bf16": "bf16", "fp16": "bf16", "int8": "int8", "int4": "int4"}
        stores = []
        # Enough cache copies to cycle through >= 256 MiB, so runs do not hit L2 (50-60 MB).
        k0 = _random_store(jax.random.fold_in(key, 1), kinds[fmt.k], shape, group)
        v0 = _random_store(jax.random.fold_in(key, 2), kinds[fmt.v], shape, group)
        one_bytes = sum(x.nbytes for x in jax.tree.leaves((k0, v0)))
        copies = max(1, -(-(256 << 20) // one_bytes))
        stores = [(k0, v0)] + [
            jax.tree.map(lambda x: x + 0 if x.dtype != jnp.uint8 else x ^ jnp.uint8(i), (k0, v0))
            for i in range(1, copies)
        ]
        calls = max(args.calls, copies)
        pos = jnp.full((b,), length - 1, jnp.int32)
        qs = [jax.random.normal(jax.random.fold_in(key, 100 + i), (b, h, d), jnp.bfloat16) for i in range(calls)]
        ref_us = ref_bw = None
        expected = None
        if not args.no_reference:
            ref_fn = lambda q, kk, vv: flash_decode_reference(q, kk, vv, pos)  # noqa: E731
            try:
                t = _bench(ref_fn, [(qs[i], *stores[i % copies]) for i in range(calls)], args.samples)
                ref_us, ref_bw = t * 1e6, one_bytes / t
                expected = jax.jit(ref_fn)(qs[0], *stores[0]).astype(jnp.float32)
            except Exception as e:  # e.g. out of memory at 128k, batch 8: still time the kernel
                print(f"XLA reference failed for B={b} L={length} {fmt_name}: {type(e).__name__}: {str(e)[:200]}")
        for bs, ns, nw, nst in knobs:
            kern = functools.partial(flash_decode, block_s=bs, num_splits=ns, num_warps=nw, num_stages=nst)
            fn = lambda q, kk, vv: kern(q, kk, vv, pos)  # noqa: E731
            cfg = default_config("int4" if fmt.k == "int4" else fmt.k, "int4" if fmt.v == "int4" else fmt.v, b, kh, length)
            cfg = Config(bs or cfg.block_s, ns or default_num_splits(b, kh, length, bs or cfg.block_s),
                         nw or cfg.num_warps, nst or cfg.num_stages)
            try:
                t = _bench(fn, [(qs[i], *stores[i % copies]) for i in range(calls)], args.samples)
            except Exception as e:  # a knob setting Triton rejects (e.g. shared memory): report, go on
                print(f"B={b} L={length} {fmt_name} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                continue
            err = "-"
            if expected is not None:
                err = f"{float(jnp.max(jnp.abs(jax.jit(fn)(qs[0], *stores[0]).astype(jnp.float32) - expected))):.2e}"
            bw = one_bytes / t
            rows.append([b, length, fmt_name, cfg.block_s, cfg.num_splits, cfg.num_warps, cfg.num_stages,
                         f"{t * 1e6:.1f}", f"{bw / 1e9:.0f}", f"{100 * bw / copy_bw:.0f}",
                         "-" if ref_us is None else f"{ref_us:.1f}",
                         "-" if ref_bw is None else f"{ref_bw / 1e9:.0f}",
                         "-" if ref_us is None else f"{ref_us / (t * 1e6):.2f}", err])
            print(" | ".join(map(str, rows[-1])), flush=True)
        del stores, k0, v0, qs, expected
        gc.collect()
    print()
    print(f"flash_decode on {env['jax_device_kind']}: H={h}, K={kh}, D={d}, query at position L-1 of an L-slot cache; "
          f"GB/s = K+V bytes (data, scales, zeros) / time; % copy = of {copy_bw / 1e9:.0f} GB/s measured above")
    print(common.format_table(headers, rows))


if __name__ == "__main__":
    main()
