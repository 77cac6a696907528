"""Fused quantize-and-append: new K or V values into a KV cache store in one pass.

Reads new values x [B, T, K, D] once and writes them, quantized in the store's format,
straight into the cache buffers at per-sequence contiguous positions start[b] + t for
t < count[b]: int8 data and its scales, packed int4 nibbles with their scales and zero
points, or (Dense) a plain cast. The cache buffers are aliased to the kernel's outputs
(`input_output_aliases`), so under jit with the store donated nothing is copied.

The result equals `ollm_jax.kv_cache.write` bit for bit, under jit on the same device:

- scales: f32 absmax (int8) or max - min (int4) times the f32 reciprocal of 127 or 15
  (what XLA makes of a division by a constant on every backend), rounded to fp16;
- values: divided by the fp16-rounded scale (1.0 where it is 0), rounded half to even,
  clipped. Triton lowers an f32 division to the approximate `div.full.f32`, so on the
  GPU the kernel divides with an inline `div.rn.f32` (IEEE, as XLA's GPU `fdiv`). In
  interpret mode the kernel body is compiled by XLA's CPU backend, which rewrites
  x / broadcast(s) into x * broadcast(1 / s) in the reference and the kernel alike.
  The Triton lowering has no `round`; `_rint` rounds exactly by adding 1.5 * 2^23.

Which slots are written: for t < count[b] with start[b] + t < S; padding (t >= count[b])
and positions >= S are not written, exactly as `write` with positions -1 / past the end.
`start` must be >= 0 (positions come from the caller's own lengths).

Layout: one program per (KV head, block of `block_t` new tokens, sequence). Triton has
no scalar prefetch, so start/count arrive as int32 arrays and the cache outputs are
whole-array (untiled) refs written at dynamic `pl.ds` row offsets under a row mask; x is
whole-array too, read under the same mask (the last block may run past T).

Dimensions: B batch, T new tokens, S cache slots, K KV heads, D head_dim, H = D / 2 (int4
byte j holds channels j and j + H), N = D / group int4 groups per token and head,
C = min(group, H) channels per statistics chunk, G = H / C chunks per half, R = block_t.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ollm_jax.kv_cache import SCALE_DTYPE, Dense, Int4, Int8, LayerCache, write

# XLA rewrites a division by a constant into a multiplication by its f32 reciprocal.
_INV127 = np.float32(1.0) / np.float32(127.0)
_INV15 = np.float32(1.0) / np.float32(15.0)
_RINT_MAGIC = np.float32(1.5 * 2**23)
_RINT_MAGIC_BITS = int(_RINT_MAGIC.view(np.int32))

DEFAULT_BLOCK_ELEMS = 8192  # block_t * D of new values per program, by default


def _rint(y: jax.Array, gpu: bool) -> jax.Array:
    """Round half to even (= jnp.round), to int32; |y| < 2^22 (quantized values are).

    The Triton lowering has no `round`: on the GPU, y + 1.5 * 2^23 lands where the f32
    spacing is 1, so the add itself rounds y half-even and the low mantissa bits hold the
    result (read through a bitcast; y comes from the opaque inline division, so nothing
    fuses it into an FMA). In interpret mode XLA's CPU backend would fold (y + M) - M and
    contract a preceding multiply into the add, so there it is `jnp.round`.
    """
    if not gpu:
        return jnp.round(y).astype(jnp.int32)
    return lax.bitcast_convert_type(y + _RINT_MAGIC, jnp.int32) - _RINT_MAGIC_BITS


def _div(a: jax.Array, b: jax.Array, gpu: bool) -> jax.Array:
    """a / b (f32, same shape): `div.rn.f32` inline on the GPU, plain `/` in interpret."""
    if not gpu:
        return a / b
    [q] = plt.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return q


def _int4_half(h: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """Min and max of each C-channel chunk: h [R, H] -> ([R, G], [R, G])."""
    r, w = h.shape
    g = h.reshape(r, w // c, c)  # [R, G, C]
    return jnp.min(g, axis=2), jnp.max(g, axis=2)


def _int4_nibbles(h, zero, scale, c: int, gpu: bool) -> jax.Array:
    """h [R, H] f32, zero/scale [R, G] fp16 -> nibbles [R, H] int32 in [0, 15]."""
    r, w = h.shape
    g = h.reshape(r, w // c, c)  # [R, G, C]
    s32 = scale.astype(jnp.float32)
    den = jnp.where(s32 == 0, 1.0, s32)  # [R, G]
    y = _div(g - zero.astype(jnp.float32)[:, :, None], jnp.broadcast_to(den[:, :, None], g.shape), gpu)
    n = jnp.clip(_rint(y, gpu), 0, 15)  # [R, G, C] int32
    return n.reshape(r, w)


def _kernel(start_ref, count_ref, x_ref, *refs, fmt: str, block_t: int, group: int, gpu: bool):
    # start_ref, count_ref: [B] int32 (whole arrays)
    # x_ref: [B, T, K, D] new values (whole array)
    # refs: the store's input buffers (aliased, unused) then the same buffers as outputs:
    #   dense: x [B, S, K, D];  int8: q [B, S, K, D] int8, scale [B, S, K] fp16;
    #   int4: q [B, S, K, H] uint8, scale [B, S, K, N] fp16, zero [B, S, K, N] fp16
    outs = refs[len(refs) // 2:]
    k, i, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    s_len, d = outs[0].shape[1], x_ref.shape[3]
    start, count = start_ref[b], count_ref[b]
    t0 = i * block_t
    p0 = start + t0
    rows = jnp.arange(block_t, dtype=jnp.int32)  # [R]
    valid = (t0 + rows < count) & (p0 + rows < s_len)  # [R] written rows

    def mask(width):  # [R, width]
        return jnp.broadcast_to(valid[:, None], (block_t, width))

    def load(c0, width):  # new values, channels [c0, c0 + width): [R, width] f32
        ref = x_ref.at[b, pl.ds(t0, block_t), k, pl.ds(c0, width)]
        return plt.load(ref, mask=mask(width), other=0.0).astype(jnp.float32)

    def put(ref, c0, width, val):  # cache rows [p0, p0 + R), channels [c0, c0 + width)
        plt.store(ref.at[b, pl.ds(p0, block_t), k, pl.ds(c0, width)], val.astype(ref.dtype), mask=mask(width))

    @pl.when(t0 < count)
    def _():
        if fmt == "dense":
            [x_out] = outs
            put(x_out, 0, d, load(0, d))
        elif fmt == "int8":
            q_out, scale_out = outs
            x = load(0, d)  # [R, D]
            scale = (jnp.max(jnp.abs(x), axis=1) * _INV127).astype(SCALE_DTYPE)  # [R]
            s32 = scale.astype(jnp.float32)
            den = jnp.where(s32 == 0, 1.0, s32)  # [R]
            q = jnp.clip(_rint(_div(x, jnp.broadcast_to(den[:, None], x.shape), gpu), gpu), -127, 127)
            put(q_out, 0, d, q)  # [R, D] int32 -> int8
            plt.store(scale_out.at[b, pl.ds(p0, block_t), k], scale, mask=valid)  # [R]
        else:
            q_out, scale_out, zero_out = outs
            h = d // 2
            c = min(group, h)
            lo, hi = load(0, h), load(h, h)  # [R, H]: channels j and j + H
            stats = [_int4_half(lo, c), _int4_half(hi, c)]  # (min, max) [R, G] per half
            if group > h:  # one group spans both halves (group == D): [R, 1]
                both = (jnp.minimum(stats[0][0], stats[1][0]), jnp.maximum(stats[0][1], stats[1][1]))
                stats = [both, both]
            nibbles = []
            for j, (half, (mn, mx)) in enumerate(zip((lo, hi), stats)):
                zero = mn.astype(SCALE_DTYPE)  # [R, G]
                scale = ((mx - mn) * _INV15).astype(SCALE_DTYPE)
                n_groups = zero.shape[1]
                if j == 0 or group <= h:  # a group shared by both halves is stored once
                    put(zero_out, j * n_groups, n_groups, zero)
                    put(scale_out, j * n_groups, n_groups, scale)
                nibbles.append(_int4_nibbles(half, zero, scale, c, gpu))  # [R, H] int32
            put(q_out, 0, h, nibbles[0] | (nibbles[1] << 4))  # [R, H] -> uint8


def _leaves(store) -> tuple[str, tuple[jax.Array, ...]]:
    if isinstance(store, Dense):
        return "dense", (store.x,)
    if isinstance(store, Int8):
        return "int8", (store.q, store.scale)
    if isinstance(store, Int4):
        return "int4", (store.q, store.scale, store.zero)
    raise TypeError(f"quantize_append supports Dense, Int8 and Int4 stores, not {type(store).__name__}")


def _rebuild(fmt: str, leaves) -> Dense | Int8 | Int4:
    return {"dense": Dense, "int8": Int8, "int4": Int4}[fmt](*leaves)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check(store, x, start, count, block_t):
    fmt, leaves = _leaves(store)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, T, K, D], got {x.shape=}")
    b, t, k, d = x.shape
    sb, _, sk = leaves[0].shape[:3]
    sd = store.x.shape[3] if fmt == "dense" else store.q.shape[3] * (2 if fmt == "int4" else 1)
    if (sb, sk, sd) != (b, k, d):
        raise ValueError(f"{x.shape=} does not match the store's [B, S, K, D] = {(sb, leaves[0].shape[1], sk, sd)}")
    if start.shape != (b,) or count.shape != (b,):
        raise ValueError(f"start and count must be [B] = [{b}], got {start.shape=} {count.shape=}")
    if not _pow2(d) or (fmt == "int4" and d < 2):  # int4 needs two halves
        raise ValueError(f"head_dim {d=} must be a power of 2 for the Triton lowering")
    if fmt == "int4" and not _pow2(store.group):
        raise ValueError(f"int4 group {store.group=} must be a power of 2")
    if block_t is not None and not _pow2(block_t):
        raise ValueError(f"{block_t=} must be a power of 2")
    return fmt, leaves, (b, t, k, d)


@functools.partial(
    jax.jit, static_argnames=("block_t", "num_warps", "num_stages", "interpret"), donate_argnames=("store",)
)
def quantize_append(
    store: Dense | Int8 | Int4,
    x: jax.Array,
    start: jax.Array,
    count: jax.Array,
    *,
    block_t: int | None = None,
    num_warps: int = 4,
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
      block_t: new tokens per program (power of 2; default 8192 // D, at most T rounded
        up to a power of 2).
      num_warps, num_stages: Triton launch parameters.
      interpret: run the kernel in Pallas interpret mode (CPU).
    Returns:
      The store with the new rows written; every other slot unchanged.
    """
    fmt, leaves, (b, t, k, d) = _check(store, x, start, count, block_t)
    if block_t is None:
        block_t = max(1, DEFAULT_BLOCK_ELEMS // d)
    block_t = min(block_t, pl.next_power_of_2(t))
    group = store.group if fmt == "int4" else 0
    count = jnp.clip(count.astype(jnp.int32), 0, t)
    kernel = functools.partial(_kernel, fmt=fmt, block_t=block_t, group=group, gpu=not interpret)
    n_in = 3  # start, count, x
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves],
        grid=(k, pl.cdiv(t, block_t), b),  # head fastest: neighbouring programs read neighbouring rows
        input_output_aliases={n_in + j: j for j in range(len(leaves))},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"quantize_append_{fmt}",
    )(start.astype(jnp.int32), count, x, *leaves)
    return _rebuild(fmt, out)


@jax.jit
def quantize_append_reference(store: Dense | Int8 | Int4, x, start, count) -> Dense | Int8 | Int4:
    """The exact semantics in plain JAX: `kv_cache.write` at positions start + t, t < count.

    Jitted (the bit-exact comparison holds between compiled programs: XLA's rewrites of
    divisions are part of what `write` produces). Not donated.
    """
    t = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]  # [1, T]
    positions = jnp.where(t < count[:, None], start[:, None] + t, -1)  # [B, T]
    # write() fills K and V; the V half is dead code under jit.
    return write(LayerCache(k=store, v=store), x, x, positions).k


# --------------------------------------------------------------------------- benchmark


def _bench(args):  # pragma: no cover - GPU only
    import time

    from bench import common
    from ollm_jax import kv_cache

    def empty(fmt, shape):
        kind, group = (fmt.split("-g") + ["64"])[:2]
        return kv_cache.empty_store(kind, shape, min(int(group), shape[-1]))

    def loop_of(fn, inner):
        def body(_, carry):  # the barrier keeps XLA from hoisting the loop-invariant encode(x)
            st, xx = jax.lax.optimization_barrier(carry)
            return fn(st, xx), xx
        return jax.jit(lambda st, xx: jax.lax.fori_loop(0, inner, body, (st, xx))[0], donate_argnums=0)

    def seconds(fn, store, x):
        loop = loop_of(fn, args.inner)
        store = jax.block_until_ready(loop(store, x))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            store = jax.block_until_ready(loop(store, x))
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) / args.inner

    env = common.environment()
    common.print_environment(env)
    copy = common.jax_copy_bandwidth(1 << 30)
    print(f"device copy bandwidth (jax x+1 over 1 GiB, read+write): {copy / 1e9:,.0f} GB/s\n")
    knobs = dict(num_warps=args.num_warps, num_stages=args.num_stages)
    cases = [((1, 16384, 8, 128), 32768, f) for f in args.formats]
    cases += [((2, 2048, 32, 64), 4096, f) for f in args.formats]
    print(f"{'B,T,K,D':>16} {'S':>6} {'format':>10} {'impl':>18} {'us':>9} {'GB/s':>8} {'%copy':>6}  exact")
    for (b, t, k, d), s, fmt in cases:
        x = jax.random.normal(jax.random.key(0), (b, t, k, d), jnp.bfloat16)
        start = jnp.arange(b, dtype=jnp.int32) * 7  # unaligned starts
        count = jnp.full((b,), t, jnp.int32)
        store = empty(fmt, (b, s, k, d))
        written = jax.eval_shape(lambda: kv_cache.encode(store, x))
        moved = x.size * x.dtype.itemsize + sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(written))
        want = quantize_append_reference(store, x, start, count)
        block_ts = args.block_t or [None]
        impls = [(f"pallas R={bt or 'auto'} w={args.num_warps}", bt) for bt in block_ts] + [("xla write", "xla")]
        for name, bt in impls:
            if bt == "xla":
                fn = lambda st, xx: quantize_append_reference(st, xx, start, count)  # noqa: E731
                exact = ""
            else:
                fn = lambda st, xx, bt=bt: quantize_append(st, xx, start, count, block_t=bt, **knobs)  # noqa: E731
                got = quantize_append(empty(fmt, (b, s, k, d)), x, start, count, block_t=bt, **knobs)
                bad = sum(int(jnp.sum(g != w)) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
                exact = "yes" if bad == 0 else f"NO: {bad} elements differ"
            sec = seconds(fn, empty(fmt, (b, s, k, d)), x)
            print(f"{str((b, t, k, d)):>16} {s:>6} {fmt:>10} {name:>18} {sec * 1e6:9.1f} "
                  f"{moved / sec / 1e9:8,.0f} {100 * moved / sec / copy:5.1f}%  {exact}")


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["int8", "int4-g64", "int4-g128", "bf16"])
    p.add_argument("--block-t", type=int, nargs="+", help="block_t values to sweep (default: the kernel's)")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=1)
    p.add_argument("--inner", type=int, default=20, help="calls per timed jitted loop")
    p.add_argument("--reps", type=int, default=30, help="timed loops; the median is reported")
    _bench(p.parse_args())
