"""Fused quantize-and-append: new K and/or V values into KV cache stores in one pass.

Reads new values x [B, T, K, D] once and writes them, quantized in the store's format,
straight into the cache buffers at per-sequence contiguous positions start[b] + t for
t < count[b]: int8 values four to a word with their scales, packed int4 nibbles with their scales and zero
points, or (Dense) a plain cast. The cache buffers are aliased to the kernel's outputs
(`input_output_aliases`), so under jit with the stores donated nothing is copied.
`quantize_append` fills one store; `quantize_append_kv` fills a layer's K and V stores
(any two of Dense/Int8/Int4) in one launch.

The result equals `ollm_jax.kv_cache.write(..., impl="xla")` bit for bit, on the CPU
(interpret mode) and on the GPU, because no step has a backend-dependent result:

- scales: f32 absmax (int8) or max - min (int4) times the f32 constant 1 / 127 or 1 / 15,
  rounded to fp16 (`kv_cache.INV127`, `INV15`);
- values: multiplied by `kv_cache.reciprocal_fp16(scale)` (the correctly rounded f32
  reciprocal, once per token and head, or per group: f32 division differs between XLA's
  CPU, XLA's GPU `div.full` and Triton, so the reference computes it with integer
  operations and the kernel with one IEEE `rcp.rn.f32`, the same bits), clipped, then
  rounded half to even. Triton lowers no `round`; `_rint` adds 1.5 * 2^23 (after the
  clip, so no compiler can fuse the multiply and the add into an FMA) and reads the
  integer from the low mantissa bits.

Which slots are written: for t < count[b] with start[b] + t < S; padding (t >= count[b])
and positions >= S are not written, exactly as `write` with positions -1 / past the end.
`start` must be >= 0 (positions come from the caller's own lengths).

Layout: one program per (group of `heads` KV heads, block of `block_t` new tokens,
sequence); it loads a [block_t, heads, D] tile of x (16 tokens of one head by default)
and, for a fused K+V call, does the same for V. A dense store is token-major like x and
takes the tile as it is; quantized stores are head-major (`ollm_jax.kv_cache`), so the
tile is transposed to [heads, block_t, ...] in registers and each head's rows are
written as one stretch. Triton has no scalar prefetch, so start/count arrive as int32
arrays and x and the cache buffers are whole-array (untiled) refs addressed at dynamic
`pl.ds` offsets under a row mask (the last token block may run past T; rows past S are
dropped). int8 and int4 load the four quarters of head_dim (the four values of a word)
separately, int4 chunk by chunk with one statistics group per chunk (or per span of
quarters, for a group wider than a quarter), so nothing is reshaped or sliced in
registers.

Dimensions: B batch, T new tokens, S cache slots, K KV heads, D head_dim, W = D / 4 (word
j holds channels j + e * W: byte e of an int8 word, nibble e of an int4 one), N = D / group
int4 groups per token and head, C = min(group, W) channels per statistics chunk, R = block_t,
KH = heads per program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ollm_jax.kv_cache import (INV15, INV127, SCALE_DTYPE, Dense, Int4, Int8, LayerCache, dims, fp16_to_f32,
                               reciprocal_fp16, write)

_RINT_MAGIC = np.float32(1.5 * 2**23)
_RINT_MAGIC_BITS = int(_RINT_MAGIC.view(np.int32))

# Defaults (tunable per call): a program moves a [block_t, heads, D] tile, DEFAULT_BLOCK_T
# tokens of DEFAULT_HEADS KV head, with DEFAULT_NUM_WARPS warps. Quantized stores are
# head-major, so one head's block_t rows are one stretch of the cache (its words and its
# scales). On an H200 (session 10, `-s10-g-qa_tiles_long.log`, GPU time) 16 tokens of one
# head on one warp was the one setting at >= 70% of copy in every case: a 16k-token append
# at Llama-3.1-8B heads took 13.1 us for int4-g64, 14.7 for int8 and 27.3 for K+V int8; the
# seed's shape [2, 32, 2048, 64] 7.2 us for int4-g64, 7.2 for int8 and 13.4 for K+V. (The
# session-9 tile, one token of all 8 heads, took 18.0 us for int4-g64 at 16k on head-major
# stores, `-s10-f-qa_tiles.log`.)
DEFAULT_BLOCK_T = 16
DEFAULT_HEADS = 1
DEFAULT_NUM_WARPS = 1


def _rint(y: jax.Array) -> jax.Array:
    """Round half to even (= jnp.round) to int32, for |y| < 2^22.

    Triton lowers no `round`: y + 1.5 * 2^23 lands where the f32 spacing is 1, so the
    add itself rounds y half-even and the low mantissa bits hold the result (read
    through a bitcast; the constant's low 22 bits are 0, so narrowing to int8 or a
    nibble needs no subtraction and the compiler drops it). y must not come straight
    from a multiply, which a compiler may fuse with the add into an FMA (one rounding
    instead of two): the callers clip y first.
    """
    return lax.bitcast_convert_type(y + _RINT_MAGIC, jnp.int32) - _RINT_MAGIC_BITS


def _reciprocal(scale: jax.Array, interpret: bool) -> jax.Array:
    """`reciprocal_fp16(scale)`, the correctly rounded f32 1 / scale of fp16 scales >= 0
    (0 -> 1, inf -> 0): on the GPU one IEEE round-to-nearest `rcp.rn.f32` (the same bits,
    checked on every fp16 value by tests/test_quantize_append.py) in place of two integer
    divisions; interpret mode runs `reciprocal_fp16` itself."""
    if interpret:
        return reciprocal_fp16(scale)
    s32 = fp16_to_f32(scale)
    [inv] = plt.elementwise_inline_asm("rcp.rn.f32 $0, $1;", args=[jnp.where(s32 == 0, 1.0, s32)],
                                       constraints="=f,f", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(s32.shape, jnp.float32)])
    return inv  # rcp.rn.f32(inf) = 0


def _append(fmt: str, group: int, x_ref, outs, *, b, t0, p0, k0, count, block_t: int, heads: int, interpret: bool):
    """One store's part of a program: tokens [t0, t0 + R) of sequence b, heads
    [k0, k0 + KH), written at cache rows [p0, p0 + R)."""
    r, kh = block_t, heads
    d = x_ref.shape[3]
    s_len = outs[0].shape[1 if fmt == "dense" else 2]  # dense stores are token-major, the others head-major
    rows = jnp.arange(r, dtype=jnp.int32)  # [R]
    valid = (t0 + rows < count) & (p0 + rows < s_len)  # [R] written rows
    hs, ts, ps = pl.ds(k0, kh), pl.ds(t0, r), pl.ds(p0, r)

    def mask(*shape):  # [R, *shape]
        return lax.broadcast_in_dim(valid, (r, *shape), (0,))

    def mask_h(*shape):  # [KH, R, *shape]
        return lax.broadcast_in_dim(valid, (kh, r, *shape), (1,))

    def load(c0, width):  # new values, channels [c0, c0 + width), head-major: [KH, R, width] f32
        x = plt.load(x_ref.at[b, ts, hs, pl.ds(c0, width)], mask=mask(kh, width), other=0)  # [R, KH, width]
        return jnp.swapaxes(x, 0, 1).astype(jnp.float32)

    def put(ref, c0, width, val):  # [KH, R, width] -> cache rows [p0, p0 + R), channels [c0, c0 + width)
        plt.store(ref.at[b, hs, ps, pl.ds(c0, width)], val.astype(ref.dtype), mask=mask_h(width))

    def put_stat(ref, val, *at):  # [KH, R] int8 scales, or an int4 group's scale or zero (at = n, 0 or 1)
        plt.store(ref.at[(b, hs, ps, *map(jnp.int32, at))], val.astype(ref.dtype), mask=mask_h())

    if fmt == "dense":  # token-major: a plain copy
        [x_out] = outs
        val = plt.load(x_ref.at[b, ts, hs, pl.ds(0, d)], mask=mask(kh, d), other=0)
        plt.store(x_out.at[b, ps, hs, pl.ds(0, d)], val.astype(x_out.dtype), mask=mask(kh, d))
    elif fmt == "int8":
        q_out, scale_out = outs
        w = d // 4
        quarters = [load(c * w, w) for c in range(4)]  # [KH, R, W]: channels j + c * W
        absmax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=2) for x in quarters])  # [KH, R]
        scale = (absmax * INV127).astype(SCALE_DTYPE)
        inv = _reciprocal(scale, interpret)[:, :, None]
        words = None
        for c, x in enumerate(quarters):  # byte c of each word: its int8 bits
            byte = (_rint(jnp.clip(x * inv, -127.0, 127.0)) & 0xFF) << (8 * c)  # [KH, R, W] int32
            words = byte if words is None else words | byte
        put(q_out, 0, w, lax.bitcast_convert_type(words, jnp.uint32))
        put_stat(scale_out, scale)
    else:
        q_out, sz_out = outs
        w = d // 4
        c = min(group, w)  # channels per chunk: one group, or one quarter of a larger group
        span = max(1, group // w)  # quarters per group (a group wider than a quarter spans several)
        for j in range(w // c):  # word columns [j*C, (j+1)*C): nibble e holds channels e*W + j*C..
            quarters = [load(e * w + j * c, c) for e in range(4)]  # [KH, R, C] each
            words = None
            for e0 in range(0, 4, span):  # quarters e0 .. e0 + span - 1: one group, one set of statistics
                members = quarters[e0:e0 + span]
                mn = functools.reduce(jnp.minimum, [jnp.min(v, axis=2) for v in members])  # [KH, R]
                mx = functools.reduce(jnp.maximum, [jnp.max(v, axis=2) for v in members])
                zero = mn.astype(SCALE_DTYPE)
                scale = ((mx - mn) * INV15).astype(SCALE_DTYPE)
                n = (e0 * w + j * c) // group
                put_stat(sz_out, scale, n, 0)
                put_stat(sz_out, zero, n, 1)
                zero32, inv = fp16_to_f32(zero)[:, :, None], _reciprocal(scale, interpret)[:, :, None]
                for e, v in enumerate(members, start=e0):
                    nibble = _rint(jnp.clip((v - zero32) * inv, 0.0, 15.0)) << (4 * e)  # [KH, R, C] int32
                    words = nibble if words is None else words | nibble
            put(q_out, j * c, c, words)  # -> uint16


def _kernel(start_ref, count_ref, *refs, parts, block_t: int, heads: int, interpret: bool):
    # start_ref, count_ref: [B] int32 (whole arrays)
    # refs: x of each part [B, T, K, D] (whole arrays), every part's store buffers as
    #   inputs (aliased, unused), then the same buffers as outputs:
    #   dense: x [B, S, K, D];  head-major int8: q [B, K, S, W] uint32, scale [B, K, S] fp16;
    #   int4: q [B, K, S, W] uint16, scale_zero [B, K, S, N, 2] fp16
    # parts: ((fmt, group, number of buffers), ...), one per store (K, or K and V)
    xs = refs[:len(parts)]
    outs = refs[len(parts) + sum(p[2] for p in parts):]
    k, i, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, count = start_ref[b], count_ref[b]
    t0 = i * block_t
    where = dict(b=b, t0=t0, p0=start + t0, k0=k * heads, count=count, block_t=block_t, heads=heads)

    @pl.when(t0 < count)
    def _():
        j = 0
        for (fmt, group, n), x_ref in zip(parts, xs):
            _append(fmt, group, x_ref, outs[j:j + n], interpret=interpret, **where)
            j += n


def _leaves(store) -> tuple[str, tuple[jax.Array, ...]]:
    if isinstance(store, Dense):
        return "dense", (store.x,)
    if isinstance(store, Int8):
        return "int8", (store.q, store.scale)
    if isinstance(store, Int4):
        return "int4", (store.q, store.scale_zero)
    raise TypeError(f"quantize_append supports Dense, Int8 and Int4 stores, not {type(store).__name__}")


def _rebuild(fmt: str, leaves) -> Dense | Int8 | Int4:
    return {"dense": Dense, "int8": Int8, "int4": Int4}[fmt](*leaves)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check(store, x, start, count):
    fmt, leaves = _leaves(store)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, T, K, D], got {x.shape=}")
    b, t, k, d = x.shape
    sb, ss, sk, sd = dims(store)
    if (sb, sk, sd) != (b, k, d):
        raise ValueError(f"{x.shape=} does not match the store's [B, S, K, D] = {(sb, ss, sk, sd)}")
    if start.shape != (b,) or count.shape != (b,):
        raise ValueError(f"start and count must be [B] = [{b}], got {start.shape=} {count.shape=}")
    if not _pow2(d) or (fmt in ("int4", "int8") and d < 4):  # quantized: four quarters
        raise ValueError(f"head_dim {d=} must be a power of 2 for the Triton lowering")
    if fmt == "int4" and not _pow2(store.group):
        raise ValueError(f"int4 group {store.group=} must be a power of 2")
    return fmt, leaves


def default_config(t: int) -> dict[str, int]:
    """The default knobs for x [B, T, K, D]: {"block_t", "heads", "num_warps"}."""
    return {"block_t": min(DEFAULT_BLOCK_T, pl.next_power_of_2(t)), "heads": DEFAULT_HEADS,
            "num_warps": DEFAULT_NUM_WARPS}


def _append_call(stores, xs, start, count, *, block_t, heads, num_warps, num_stages, interpret):
    parts, leaves = [], []
    for store, x in zip(stores, xs):
        fmt, lv = _check(store, x, start, count)
        parts.append((fmt, store.group if fmt == "int4" else 0, len(lv)))
        leaves.append(lv)
    b, t, k, d = xs[0].shape
    if any(x.shape != xs[0].shape for x in xs):
        raise ValueError(f"k and v must have one shape, got {[x.shape for x in xs]}")
    if block_t is not None and not _pow2(block_t):
        raise ValueError(f"{block_t=} must be a power of 2")
    if heads is not None and not (_pow2(heads) and k % heads == 0):
        raise ValueError(f"{heads=} must be a power of 2 dividing the {k} KV heads")
    cfg = default_config(t)
    heads = heads or cfg["heads"]
    block_t = min(block_t or cfg["block_t"], pl.next_power_of_2(t))
    num_warps = num_warps or cfg["num_warps"]
    flat = [a for lv in leaves for a in lv]
    n_in = 2 + len(xs)  # start, count, xs
    kernel = functools.partial(_kernel, parts=tuple(parts), block_t=block_t, heads=heads, interpret=interpret)
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flat],
        grid=(k // heads, pl.cdiv(t, block_t), b),  # heads fastest: neighbours read neighbouring bytes
        input_output_aliases={n_in + j: j for j in range(len(flat))},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="quantize_append_" + "_".join(p[0] for p in parts),
    )(start.astype(jnp.int32), jnp.clip(count.astype(jnp.int32), 0, t), *xs, *flat)
    result, j = [], 0
    for (fmt, _, n) in parts:
        result.append(_rebuild(fmt, out[j:j + n]))
        j += n
    return result


_KNOBS = ("block_t", "heads", "num_warps", "num_stages", "interpret")


@functools.partial(jax.jit, static_argnames=_KNOBS, donate_argnames=("store",))
def quantize_append(
    store: Dense | Int8 | Int4,
    x: jax.Array,
    start: jax.Array,
    count: jax.Array,
    *,
    block_t: int | None = None,
    heads: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
    interpret: bool = False,
) -> Dense | Int8 | Int4:
    """Quantizes x and writes it into `store` at rows start[b] + t, t < count[b], in place.

    Args:
      store: a `kv_cache` Dense, Int8 or Int4 store ([B, S, K, D] values). Donated: its
        buffers become the result's (the caller's `store` is invalid afterwards; inside
        an outer jit, donate the cache there to keep the update in place).
      x: [B, T, K, D] new values (bf16/fp16/fp32, finite).
      start: [B] int32 >= 0, the position of x[b, 0].
      count: [B] int32 in [0, T], valid tokens of each row (the rest is padding).
      block_t: new tokens per program (power of 2; default DEFAULT_BLOCK_T, at most T
        rounded up to a power of 2).
      heads: KV heads per program (a power of 2 dividing K; default DEFAULT_HEADS).
      num_warps, num_stages: Triton launch parameters (default num_warps:
        DEFAULT_NUM_WARPS; the kernel has no loop, so num_stages changes nothing).
      interpret: run the kernel in Pallas interpret mode (CPU).
    Returns:
      The store with the new rows written; every other slot unchanged.
    """
    [out] = _append_call([store], [x], start, count, block_t=block_t, heads=heads, num_warps=num_warps,
                         num_stages=num_stages, interpret=interpret)
    return out


@functools.partial(jax.jit, static_argnames=_KNOBS, donate_argnames=("k_store", "v_store"))
def quantize_append_kv(
    k_store: Dense | Int8 | Int4,
    v_store: Dense | Int8 | Int4,
    k: jax.Array,
    v: jax.Array,
    start: jax.Array,
    count: jax.Array,
    *,
    block_t: int | None = None,
    heads: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
    interpret: bool = False,
) -> tuple[Dense | Int8 | Int4, Dense | Int8 | Int4]:
    """`quantize_append` of k into k_store and v into v_store, in one kernel launch.

    The stores may have different formats (e.g. int8 keys, int4 values); k and v are
    both [B, T, K, D]. Both stores are donated. Returns (k_store, v_store).
    """
    k_out, v_out = _append_call([k_store, v_store], [k, v], start, count, block_t=block_t, heads=heads,
                                num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return k_out, v_out


def _positions(t: int, start, count):
    t = jnp.arange(t, dtype=jnp.int32)[None, :]  # [1, T]
    return jnp.where(t < count[:, None], start[:, None] + t, -1)  # [B, T]


@jax.jit
def quantize_append_reference(store: Dense | Int8 | Int4, x, start, count) -> Dense | Int8 | Int4:
    """The exact semantics in plain JAX: `kv_cache.write(impl="xla")` at positions
    start + t, t < count. Jitted, not donated."""
    # write() fills K and V; the V half is dead code under jit.
    return write(LayerCache(k=store, v=store), x, x, _positions(x.shape[1], start, count), impl="xla").k


@jax.jit
def quantize_append_kv_reference(k_store, v_store, k, v, start, count):
    """`quantize_append_kv` in plain JAX (`kv_cache.write(impl="xla")`); (k_store, v_store)."""
    out = write(LayerCache(k=k_store, v=v_store), k, v, _positions(k.shape[1], start, count), impl="xla")
    return out.k, out.v


# --------------------------------------------------------------------------- benchmark


def _bench(args):  # pragma: no cover - GPU only
    import itertools
    import time

    from bench import common
    from ollm_jax import kv_cache

    t_begin = time.perf_counter()
    it = {"interpret": True} if args.interpret else {}  # a CPU smoke test of this script
    torch_bw = None if args.no_torch else common.torch_copy_bandwidth_in_child(1 << 30)  # before jax takes the GPU
    env = common.environment()
    common.print_environment(env)
    jax_bw = common.jax_copy_bandwidth(1 << 30)
    print(f"copy bandwidth, 1 GiB read + written: jax x+1 {jax_bw / 1e9:,.0f} GB/s, torch copy_ "
          + (f"{torch_bw / 1e9:,.0f} GB/s" if torch_bw else "-") + " (%jax, %torch below)\n")

    def calls_of(fn, n):
        def many(stores, xs):  # n calls unrolled: no while loop, whose every step may sync the host
            for _ in range(n):  # the barrier keeps XLA from sharing the work on x between calls
                stores, xs = jax.lax.optimization_barrier((stores, xs))
                stores = tuple(fn(*stores, *xs))
            return stores
        return jax.jit(many, donate_argnums=0)

    def run(fn, stores, xs):
        """(seconds per call, GPU busy seconds per call or None, final stores).
        fn(*stores, *xs) -> stores (donated, updated in place); every call writes the same
        rows, so the final stores are one call's result. Per call = the slope between
        programs of `inner` and 3 x `inner` calls (medians of `reps` runs), so the fixed
        cost of a run (dispatch, the final sync) drops out; busy = the kernels' own time
        in a profiler trace of the shorter program (`bench.common.device_busy_seconds`)."""
        state = {"stores": stores}  # donated on every call: each call takes the last one's result

        def call(many):
            state["stores"] = many(state["stores"], xs)
            return state["stores"]

        short = calls_of(fn, args.inner)
        t1, t3 = (common.median_seconds(functools.partial(call, many), args.reps)
                  for many in (short, calls_of(fn, 3 * args.inner)))
        busy = common.device_busy_seconds(functools.partial(call, short))
        return (t3 - t1) / (2 * args.inner), None if busy is None else busy / args.inner, state["stores"]

    def differing(got, want):  # bytes; want: host arrays
        return sum(int(np.sum(np.asarray(g).view(np.uint8) != w.view(np.uint8)))
                   for g, w in zip(jax.tree.leaves(got), want))

    print(f"{'B,T,K,D,S':>19} {'format':>12} {'impl':>7} {'R':>3} {'KH':>2} {'w':>2} {'st':>2} "
          f"{'us':>7} {'GB/s':>6} {'%jax':>5} {'%torch':>6} {'busy':>6} {'%torch':>6} exact")
    best = []
    stop = False
    kv_shapes = args.shapes if args.kv_shapes is None else args.kv_shapes
    cases = [(sh, f, kv) for sh in dict.fromkeys(args.shapes + kv_shapes)
             for kv, formats in ((False, args.formats if sh in args.shapes else []),
                                 (True, args.kv_formats if sh in kv_shapes else []))
             for f in formats]
    for shape_s, name, kv in cases:
        if stop:
            break
        b, t, k, d, s = map(int, shape_s.split(","))
        fmt = kv_cache.parse_format(name)
        kinds = (fmt.k, fmt.v) if kv else (fmt.k,)
        label = ("kv:" if kv else "") + name
        xs = [jax.random.normal(jax.random.key(j), (b, t, k, d), jnp.bfloat16) for j in range(len(kinds))]
        start = jnp.arange(b, dtype=jnp.int32) * 7  # unaligned starts
        count = jnp.full((b,), t, jnp.int32)

        def empty():
            return [kv_cache.empty_store(kind, (b, s, k, d), fmt.group) for kind in kinds]

        moved = sum(x.size * x.dtype.itemsize for x in xs) + sum(
            a.size * a.dtype.itemsize for st, x in zip(empty(), xs)
            for a in jax.tree.leaves(jax.eval_shape(kv_cache.encode, st, x)))
        ref = quantize_append_kv_reference if kv else lambda *a: (quantize_append_reference(*a),)
        want = [np.asarray(a) for a in jax.tree.leaves(ref(*empty(), *xs, start, count))]

        def row(impl, knobs, fn):
            nonlocal stop
            if time.perf_counter() - t_begin > args.budget_s:
                stop = True
                return
            cfg = {**default_config(t), "num_stages": 1, **knobs}
            tag = (f"{shape_s:>19} {label:>12} {impl:>7} "
                   + (" ".join(f"{cfg[key]:>{w}}" for key, w in
                               (("block_t", 3), ("heads", 2), ("num_warps", 2), ("num_stages", 2)))
                      if impl in ("pallas", "default") else f"{'':>12}"))
            try:
                sec, busy, got = run(fn, tuple(empty()), tuple(xs))
                bad = differing(got, want)
            except Exception as e:  # a config the Triton compiler rejects: report, go on
                print(f"{tag} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                return
            speed = f"{sec * 1e6:7.1f} {moved / sec / 1e9:6.0f} {100 * moved / sec / jax_bw:4.0f}% " + (
                f"{100 * moved / sec / torch_bw:5.0f}%" if torch_bw else f"{'-':>6}") + (
                f" {busy * 1e6:6.1f} " + (f"{100 * moved / busy / torch_bw:5.0f}%" if torch_bw else f"{'-':>6}")
                if busy else f" {'-':>6} {'-':>6}")
            print(f"{tag} {speed} " + ("yes" if bad == 0 else f"NO: {bad} bytes differ"), flush=True)
            if impl in ("pallas", "default") and bad == 0:
                best.append(((shape_s, label), sec, tag, speed))

        if not args.no_xla:
            row("xla", {}, lambda *a: ref(*a, start, count))
        configs = [dict(block_t=r, heads=kh, num_warps=w, num_stages=st) for r, kh, w, st in itertools.product(
            args.block_t or [None], args.heads or [None], args.num_warps or [None], args.num_stages)]
        seen = set()
        for knobs in [{}] + configs:  # {}: the defaults
            cfg = {**default_config(t), "num_stages": 1}
            cfg.update({key: val for key, val in knobs.items() if val is not None})
            cfg["block_t"] = min(cfg["block_t"], pl.next_power_of_2(t))
            key = tuple(sorted(cfg.items()))
            tile = cfg["block_t"] * cfg["heads"] * d
            if key in seen or k % cfg["heads"] or (knobs and not args.min_tile <= tile <= args.max_tile):
                continue
            seen.add(key)
            if kv:
                fn = lambda ks, vs, kx, vx, c=cfg: quantize_append_kv(ks, vs, kx, vx, start, count, **c, **it)  # noqa: E731
            else:
                fn = lambda st, x, c=cfg: (quantize_append(st, x, start, count, **c, **it),)  # noqa: E731
            row("pallas" if knobs else "default", cfg, fn)
        if kv:  # the same work as two single-store launches (default knobs)
            row("2calls", {}, lambda ks, vs, kx, vx: (quantize_append(ks, kx, start, count, **it),
                                                       quantize_append(vs, vx, start, count, **it)))
    print("\nfastest exact config per case:")
    for case in dict.fromkeys(c for c, *_ in best):
        print(" ".join(min((sec, tag, speed) for c, sec, tag, speed in best if c == case)[1:]))
    print(f"\ntotal {time.perf_counter() - t_begin:.0f} s" + (" (budget reached: stopped early)" if stop else ""))


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["int8", "int4-g64", "int4-g128", "bf16"],
                   help="kv_cache format names timed with quantize_append (their K side)")
    p.add_argument("--kv-formats", nargs="*", default=["int8", "k8v4-g64"],
                   help="kv_cache format names timed with quantize_append_kv (K and V in one launch), "
                        "beside two quantize_append calls ('2calls')")
    p.add_argument("--shapes", nargs="+", default=["1,16384,8,128,32768", "2,2048,32,64,4096"], help="B,T,K,D,S")
    p.add_argument("--kv-shapes", nargs="*", help="shapes for --kv-formats (default: --shapes); each shape's "
                   "cases run together, in order, so put the important shape first (see --budget-s)")
    p.add_argument("--block-t", type=int, nargs="+", help="block_t values to sweep (default: per heads)")
    p.add_argument("--heads", type=int, nargs="+", help="heads per program to sweep (default: the kernel's)")
    p.add_argument("--num-warps", type=int, nargs="+", help="num_warps values to sweep")
    p.add_argument("--num-stages", type=int, nargs="+", default=[1])
    p.add_argument("--min-tile", type=int, default=1, help="skip swept configs of fewer block_t*heads*D values")
    p.add_argument("--max-tile", type=int, default=1 << 15, help="... or more")
    p.add_argument("--no-xla", action="store_true", help="skip timing XLA's write (exactness is still checked)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch copy_ bandwidth (a child process)")
    p.add_argument("--budget-s", type=float, default=220, help="start no new measurement after this many seconds")
    p.add_argument("--inner", type=int, default=20, help="calls per timed jitted program (and 3x that: see run)")
    p.add_argument("--reps", type=int, default=20, help="timed loops; the median is reported")
    p.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)
    _bench(p.parse_args())
