"""flash_decode (pallas_kernels/flash_decode.py): numerics in interpret mode against its
float32 oracle, for every cache format; the kernel's inline-PTX integer conversions
through a small PTX emulator; deviceless lowering of the shipped defaults to Triton.

Tolerance. The oracle is `flash_decode_reference` with a float32 q: float32 dequantization
and softmax throughout. The kernel sees the same stored values (dots of exact integers or
cache values, float32 accumulation), so its scores match the oracle's to float32
rounding. Its only coarse roundings, with u the unit roundoff of q's dtype (2^-8 bf16,
2^-11 fp16), are
  - the probabilities (times the V scale for int8/int4 V) cast for the PV dot: each term
    p_t * w_t is off by at most u * p_t * |w_t|, with w_t = v_t for dense and int8 V and
    w_t = v_t - zero_t for int4 V; after normalization that is at most
    u * E_p[|v| (+ |zero|)], the attention-weighted mean magnitude, computed below by
    running the oracle on |v|. (Quantized V is cast to fp16, u = 2^-11, 8x finer than
    the bf16 u of the bound; that margin absorbs fp16 subnormals, <= 2^-25 |n| a term.)
  - the output cast to q's dtype: u * |out|.
An fp16 q adds an absolute term for probabilities in fp16 subnormals. So each element
must satisfy |out - oracle| <= 1.05 * u * (|oracle| + E_p|w|) + atol with atol = 1e-5
(+ the fp16 term): a bound, not a fitted number. Rows with few visible keys (positions
0, 1, 3, block edges, short windows) make a wrong mask or a lost block exceed it by far.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import kv_cache
from pallas_kernels import flash_decode as fd
from pallas_kernels import on_gpu
from tests.lowering import assert_lowers_to_triton


def make_store(side: str, x: jax.Array, group: int, lengths: jax.Array | None = None) -> kv_cache.Store:
    """x [B, S, K, D] float32 in kv_cache side format `side` (real quantization). A kivi4
    store is written by the cache's own write with the first lengths[b] tokens of each row
    (all S when None): its flushed groups and residual are what decoding leaves there."""
    if side == "kivi4":
        b, s = x.shape[:2]
        t = jnp.arange(s)[None, :]
        positions = jnp.where(t < (s if lengths is None else jnp.asarray(lengths)[:, None]), t, -1)  # [B, S]
        empty = kv_cache.empty_store("kivi4", x.shape, group)
        layer = kv_cache.LayerCache(k=empty, v=kv_cache.Dense(jnp.zeros(x.shape, jnp.bfloat16)))
        return kv_cache.write(layer, x, x, positions, impl="xla").k
    if side in kv_cache.DENSE_DTYPES:
        return kv_cache.Dense(x.astype(kv_cache.DENSE_DTYPES[side]))
    return kv_cache.encode(kv_cache.empty_store(side, x.shape, group), x)


def random_kv(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random K and V values [B, S, K, D] float32 (numpy: no RNG compilation), with
    per-token magnitudes from 0.3 to 3 so that scales differ from token to token."""
    rng = np.random.default_rng(seed)
    b, s, k, _ = shape
    return tuple(
        (rng.standard_normal(shape) * np.exp(rng.uniform(-1.2, 1.1, (b, s, k, 1)))).astype(np.float32)
        for _ in range(2)
    )


@functools.partial(jax.jit, static_argnums=0)
def make_stores(kv_format: str, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None
                ) -> tuple[kv_cache.Store, kv_cache.Store]:
    """K and V [B, S, K, D] float32 quantized into the stores of `kv_format` (a kivi4 K
    store holding the first lengths[b] tokens of each row)."""
    fmt = kv_cache.parse_format(kv_format)
    group = fmt.group if fmt.k == "kivi4" else min(fmt.group, k.shape[-1])  # kivi4: tokens
    return make_store(fmt.k, k, group, lengths), make_store(fmt.v, v, min(fmt.group, k.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Case:
    kv_format: str
    head_dim: int
    kv_heads: int
    g: int  # query heads per KV head
    max_len: int
    positions: tuple[int, ...]  # one per row; -1 = padding
    block_s: int | None = None  # None: shipped defaults
    num_splits: int | None = None
    sliding_window: int | None = None

    def __str__(self):
        w = f"-w{self.sliding_window}" if self.sliding_window else ""
        knobs = f"-bs{self.block_s}-p{self.num_splits}" if self.block_s else "-defaults"
        return f"{self.kv_format}-d{self.head_dim}-k{self.kv_heads}g{self.g}-s{self.max_len}{knobs}{w}"


# Cache lengths and positions are not multiples of block_s (partial last blocks), some
# sit on block edges, short rows leave splits empty, -1 is padding; G in {1, 3, 4, 8}.
CASES = [
    Case("bf16", 128, 2, 4, 200, (199, 31, -1, 0), 32, 3),
    Case("fp16", 64, 3, 1, 100, (99, 16, 5), 16, 4),
    Case("int8", 128, 1, 8, 150, (149, 64, -1), 32, 3),
    Case("int8", 64, 2, 3, 130, (129, 63, 0), 64, 2),
    Case("int4-g32", 128, 2, 4, 200, (199, 100, -1), 32, 3),  # N = 4 groups, two per half
    Case("int4-g64", 128, 1, 1, 77, (76, 40, 3), 16, 5),  # N = 2: one group per half
    Case("int4-g128", 128, 2, 3, 90, (89, 32, -1), 32, 2),  # N = 1: a group spans both halves
    Case("int4-g64", 64, 1, 8, 120, (119, 1), 64, 2),  # group clamped to D = 64: N = 1
    Case("int4-g32", 64, 2, 4, 100, (99, 50, -1), 32, 3),  # N = 2
    Case("k8v4-g32", 128, 2, 3, 150, (149, 70, 0), 64, 3),
    Case("k4v8-g64", 64, 2, 8, 110, (109, 33, -1), 32, 2),
    Case("bf16", 64, 2, 4, 200, (199, 120, 30, -1), 32, 3, sliding_window=50),
    Case("k8v4-g64", 128, 1, 4, 180, (179, 64, 10), 32, 4, sliding_window=33),
    Case("int4-g64", 128, 2, 4, 300, (299, 150, -1)),  # shipped defaults (block_s 256)
    # Whole blocks (S a multiple of block_s): quantized words load unmasked, slots past a
    # row's position (and before its window) are read and must drop out.
    Case("int8", 128, 2, 4, 256, (200, 63, -1), 64, 2),
    Case("int4-g64", 128, 2, 4, 256, (255, 130, 7), 32, 3),
    Case("k8v4-g32", 64, 2, 3, 128, (100, 17), 32, 2),
    Case("int4-g32", 128, 1, 4, 256, (250, 90), 64, 2, sliding_window=70),
    # kivi4 (block_s = its token group): a residual holding 38 tokens, none (whole groups),
    # one token, padding; more splits than blocks; a window inside the residual.
    Case("kivi4-g64", 128, 2, 4, 256, (101, 63, 255, 128, -1), num_splits=3),
    Case("kivi4-g32", 64, 2, 3, 160, (130, 31, 0), num_splits=8),
    Case("kivi4-g128", 128, 1, 8, 384, (300, 5, -1), num_splits=2),
    Case("kivi4-g64", 128, 2, 4, 320, (299, 130, 70), num_splits=4, sliding_window=20),
    Case("kivi4-g64", 128, 8, 4, 512, (511, 400)),  # shipped defaults
]


def kivi_oracle_stores(q: jax.Array, k: kv_cache.Kivi4, v: kv_cache.Store) -> tuple[kv_cache.Store, kv_cache.Store]:
    """Stores for the float32 oracle that score a kivi4 K as the kernel does by design.

    The kernel rounds x = q * scale (per channel and token group, with the softmax scale
    and odd quarters' 1/16, f) to fp16 once a block, so a quantized slot's score moves by
    eps_t = sum_c (fp16(x_c) - x_c) n_tc / f_c (log2 units). The returned K, one head per
    query head in float32, is the dequantized K plus eps_t q / (softmax scale |q|^2): its
    exact scores are the kernel's. V is repeated to the query heads."""
    b, h, d = q.shape
    _, s, kv_heads, _ = kv_cache.dims(k)
    g = k.group
    rep = h // kv_heads
    k_q, k_scale = (np.swapaxes(np.asarray(a), 1, 2) for a in (k.q, k.scale))  # token-major [B, S or S/g, K, ...]
    ss = d**-0.5 * fd._LOG2E
    f = np.where(np.arange(d) // (d // 4) % 2, 1 / 16, 1.0)  # [D]
    q32 = np.asarray(q, np.float32)  # [B, H, D]
    x = (q32[:, None] * np.float32(ss)) * (np.repeat(k_scale.astype(np.float32), rep, axis=2) * f)  # [B, S/g, H, D]
    dx = (x.astype(np.float16).astype(np.float32) - x) / f
    n = np.repeat(np.asarray(kv_cache.unpack_int4(jnp.asarray(k_q)), np.float32), rep, axis=2)  # [B, S, H, D]
    eps = np.einsum("bjhd,bjthd->bjth", dx, n.reshape(b, s // g, g, h, d)).reshape(b, s, h)  # [B, S, H]
    eps = np.where(np.arange(s)[None, :, None] < np.asarray(k.flushed)[:, None, None], eps, 0)  # residual: exact
    dense = np.repeat(np.asarray(kv_cache.decode_store(k, jnp.float32)), rep, axis=2)  # [B, S, H, D]
    along_q = q32 / (ss * np.sum(q32**2, axis=-1, keepdims=True))  # [B, H, D]
    k_oracle = kv_cache.Dense(jnp.asarray(dense + eps[..., None] * along_q[:, None]))
    head_axis = 2 if isinstance(v, kv_cache.Dense) else 1  # quantized stores are head-major
    return k_oracle, jax.tree.map(lambda a: jnp.repeat(a, rep, axis=head_axis), v)


@functools.partial(jax.jit, static_argnums=(4,))
def oracle(q, k, v, pos, sliding_window):
    """(oracle output, E_p[|w|], max |w|): float32 attention over v and over |w|, with
    |w| = |v| (+ |zero| broadcast to its channels for int4 V); all [B, H, D] but max."""
    q32 = q.astype(jnp.float32)
    want = fd.flash_decode_reference(q32, k, v, pos, sliding_window=sliding_window)
    w_abs = jnp.abs(kv_cache.decode_store(v, jnp.float32))  # [B, S, K, D]
    if isinstance(v, kv_cache.Int4):
        w_abs = w_abs + jnp.swapaxes(jnp.repeat(jnp.abs(v.zero.astype(jnp.float32)), v.group, axis=-1), 1, 2)
    mean_abs = fd.flash_decode_reference(q32, k, kv_cache.Dense(w_abs), pos, sliding_window=sliding_window)
    return want, mean_abs, jnp.max(w_abs)


# Interpret mode everywhere; on a GPU also the compiled kernel (with its inline PTX).
MODES = ["interpret"] + (["gpu"] if on_gpu() else [])


def _check_against_oracle(case: Case, mode: str, **knobs):
    seed = CASES.index(case)
    b, h, d = len(case.positions), case.kv_heads * case.g, case.head_dim
    lengths = jnp.asarray(case.positions) + 1
    k, v = make_stores(case.kv_format, *random_kv((b, case.max_len, case.kv_heads, d), seed), lengths)
    q_dtype = jnp.float16 if case.kv_format == "fp16" else jnp.bfloat16
    # Scores of standard deviation ~2: peaked softmaxes, so single keys matter.
    q = jnp.asarray(2.0 * np.random.default_rng(seed + 1000).standard_normal((b, h, d)), q_dtype)  # [B, H, D]
    pos = np.array(case.positions, np.int32)

    out = fd.flash_decode(
        q, k, v, pos, sliding_window=case.sliding_window, block_s=case.block_s,
        num_splits=case.num_splits, interpret=mode == "interpret", **knobs,
    )
    assert out.shape == (b, h, d) and out.dtype == q_dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), "non-finite output (padding rows included)"

    k_oracle, v_oracle = kivi_oracle_stores(q, k, v) if isinstance(k, kv_cache.Kivi4) else (k, v)
    want, mean_abs, max_abs = map(np.asarray, oracle(q, k_oracle, v_oracle, pos, case.sliding_window))
    u = float(jnp.finfo(q_dtype).eps) / 2
    atol = 1e-5
    if q_dtype == jnp.float16:  # probabilities below 2^-14 keep an absolute error <= 2^-25
        atol += case.max_len * 2.0**-25 * max_abs
    tol = 1.05 * u * (np.abs(want) + mean_abs) + atol

    rows = np.array(case.positions) >= 0  # padding rows: finite is all that is asked
    err = np.abs(out - want)[rows]
    worst = np.unravel_index(np.argmax(err - tol[rows]), err.shape)
    assert (err <= tol[rows]).all(), (
        f"max |err| {err.max():.3g}; worst excess at {worst}: err {err[worst]:.3g} > tol {tol[rows][worst]:.3g}"
    )


@pytest.mark.parametrize("transposed", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float32_oracle(case: Case, mode: str, transposed: int):
    _check_against_oracle(case, mode, transposed=transposed)


# Several queries a row at consecutive positions (a speculative verify's T = G + 1, a
# draft's two-token catch-up step): (case, T); T x G <= fd.MAX_QUERY_ROWS.
MULTI_CASES = [
    (Case("bf16", 128, 2, 4, 200, (150, 31, -1, 0), 32, 3), 5),
    (Case("int8", 64, 2, 3, 130, (100, 0), 64, 2), 2),
    (Case("int4-g32", 128, 2, 4, 200, (190, 64, -1), 32, 3), 5),
    (Case("k8v4-g64", 128, 1, 8, 180, (170, 10), 32, 4, sliding_window=33), 4),
    (Case("int8", 128, 8, 4, 300, (250, 3)), 5),  # shipped defaults
    (Case("kivi4-g64", 128, 2, 4, 256, (120, 60, -1), num_splits=3), 5),  # 60..64: quantized, then the residual
]


@pytest.mark.parametrize("transposed", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case, t", MULTI_CASES, ids=lambda c: str(c))
def test_several_queries_match_float32_oracle(case: Case, t: int, mode: str, transposed: int):
    """Query i of a row sits at its first position + i and sees the slots up to there."""
    seed = 100 + [c for c, _ in MULTI_CASES].index(case)
    b, h, d = len(case.positions), case.kv_heads * case.g, case.head_dim
    first = np.array(case.positions, np.int32)
    pos = np.where(first[:, None] >= 0, first[:, None] + np.arange(t, dtype=np.int32), -1)  # [B, T]
    lengths = jnp.asarray(pos.max(axis=1) + 1)
    k, v = make_stores(case.kv_format, *random_kv((b, case.max_len, case.kv_heads, d), seed), lengths)
    q = jnp.asarray(2.0 * np.random.default_rng(seed).standard_normal((b, t, h, d)), jnp.bfloat16)  # [B, T, H, D]
    pos[0, -1] = -1  # a trailing padding query (output unused)
    out = fd.flash_decode(q, k, v, pos, sliding_window=case.sliding_window, block_s=case.block_s,
                          num_splits=case.num_splits, transposed=transposed, interpret=mode == "interpret")
    assert out.shape == (b, t, h, d) and out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    if isinstance(k, kv_cache.Kivi4):  # the kivi4 oracle is per query (its K depends on q): one at a time
        per_query = [oracle(q[:, i], *kivi_oracle_stores(q[:, i], k, v), pos[:, i],
                            case.sliding_window) for i in range(t)]
        want, mean_abs = (np.stack([np.asarray(r[j]) for r in per_query], axis=1) for j in (0, 1))
    else:
        want, mean_abs, _ = map(np.asarray, oracle(q, k, v, pos, case.sliding_window))
    tol = 1.05 * float(jnp.finfo(jnp.bfloat16).eps) / 2 * (np.abs(want) + mean_abs) + 1e-5
    rows = pos >= 0  # [B, T]: padding rows and queries are only asked to be finite
    err = np.abs(out - want)[rows]
    assert (err <= tol[rows]).all(), f"max |err| {err.max():.3g} (excess {np.max(err - tol[rows]):.3g})"
    # ...and each query equals the one-query kernel at its own position
    for i in range(t):
        one = fd.flash_decode(q[:, i], k, v, pos[:, i], sliding_window=case.sliding_window,
                              block_s=case.block_s, num_splits=case.num_splits, interpret=mode == "interpret")
        ok = pos[:, i] >= 0
        np.testing.assert_allclose(out[ok, i], np.asarray(one.astype(jnp.float32))[ok], rtol=2e-2, atol=2e-2)


def test_a_verify_pass_through_the_kernel_equals_the_reference():
    """`model.forward` over 3 new tokens a row with the cache (a speculative verify):
    attention_impl "pallas" runs flash_decode with several queries (interpret mode),
    "xla" the reference; the same logits and caches up to bf16 rounding."""
    from ollm_jax import model
    from ollm_jax.config import ModelConfig
    from tests.conftest import TINY_HF

    cfg = ModelConfig.from_hf(dict(TINY_HF, hidden_size=128, head_dim=32), dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(0))
    prompt = jnp.asarray([[1, 5, 9, 23, 40, 7], [1, 60, 2, 8, 0, 0]], jnp.int32)
    prompt_pos = jnp.asarray([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, -1, -1]], jnp.int32)
    _, cache = model.forward(params, cfg, prompt, prompt_pos, kv_cache.create(cfg, 2, 16), attention_impl="xla")
    new = jnp.asarray([[11, 12, 13], [14, 15, 16]], jnp.int32)
    new_pos = jnp.asarray([[6, 7, 8], [4, 5, -1]], jnp.int32)  # the second row: two tokens and padding
    assert fd.supports(jnp.zeros((2, 3, cfg.num_heads, 32), jnp.bfloat16), cache.layers[0].k, cache.layers[0].v)
    copy = jax.tree.map(jnp.copy, cache)  # forward donates its cache
    got, got_cache = model.forward(params, cfg, new, new_pos, cache, attention_impl="pallas")
    want, want_cache = model.forward(params, cfg, new, new_pos, copy, attention_impl="xla")
    valid = np.asarray(new_pos) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=2e-2, atol=2e-2)
    # "pallas" also projects q/k/v in the fused norm_qkv kernel: bf16 rounding apart
    for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("t", [1, 3])
def test_kivi4_cache_through_the_kernel_equals_the_reference(t):
    """`model.forward` with a kivi4-g32 cache past its first flushed groups: a decode step
    (T = 1) and a verify pass (T = 3) through flash_decode (interpret mode) give the
    reference's logits up to bf16 rounding, and caches that hold the same values up to
    one quantization step ("pallas" projects k and v in the fused norm_qkv kernel, which
    rounds differently, so a value on a rounding edge may land one step away)."""
    from ollm_jax import model
    from ollm_jax.config import ModelConfig
    from tests.conftest import TINY_HF

    cfg = ModelConfig.from_hf(dict(TINY_HF, hidden_size=128, head_dim=64), dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(4)
    prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 70)), jnp.int32)
    prompt_pos = jnp.asarray(np.where(np.arange(70) < [[70], [45]], np.arange(70), -1), jnp.int32)  # 70 and 45
    cache = kv_cache.create(cfg, 2, 96, "kivi4-g32")
    _, cache = model.forward(params, cfg, prompt, prompt_pos, cache, attention_impl="xla")
    assert np.asarray(cache.layers[0].k.flushed).tolist() == [64, 32]
    new = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, t)), jnp.int32)
    new_pos = jnp.asarray([70, 45])[:, None] + jnp.arange(t)[None, :]
    copy = jax.tree.map(jnp.copy, cache)  # forward donates its cache
    got, got_cache = model.forward(params, cfg, new, new_pos, cache, attention_impl="pallas")
    want, want_cache = model.forward(params, cfg, new, new_pos, copy, attention_impl="xla")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    for got_layer, want_layer in zip(got_cache.layers, want_cache.layers):
        for g, w, store in zip(kv_cache.read(got_layer, jnp.float32), kv_cache.read(want_layer, jnp.float32),
                               (want_layer.k, want_layer.v)):
            step = float(jnp.max(store.scale.astype(jnp.float32)))
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-2, atol=1.01 * step)


def test_several_queries_past_the_row_limit_are_not_taken():
    x = jnp.zeros((1, 16, 8, 64), jnp.bfloat16)
    assert fd.supports(jnp.zeros((1, 4, 32, 64), jnp.bfloat16), kv_cache.Dense(x), kv_cache.Dense(x))  # 4 x 4 rows
    q = jnp.zeros((1, 9, 32, 64), jnp.bfloat16)  # 9 queries x 4 heads a KV head = 36 rows > 32
    assert not fd.supports(q, kv_cache.Dense(x), kv_cache.Dense(x))
    with pytest.raises(ValueError, match="MAX_QUERY_ROWS"):
        fd.flash_decode(q, kv_cache.Dense(x), kv_cache.Dense(x), jnp.zeros((1, 9), jnp.int32), interpret=True)


@pytest.mark.parametrize("combine", ["reference", "kernel"])
def test_combine_splits_empty_and_padding(combine):
    """Splits that saw no key (m = _MASKED, l = 0) drop out; a row no split saw gives 0."""
    fn = fd.combine_splits_reference if combine == "reference" else functools.partial(
        fd.combine_splits, out_dtype=jnp.float32, interpret=True)
    o = jnp.array([[[[[2.0, 4.0]], [[0.0, 0.0]], [[6.0, 2.0]]]]])  # [B=1, K=1, P=3, R=1, D=2]
    m = jnp.array([[[[0.0], [fd._MASKED], [1.0]]]])  # [1, 1, 3, 1]: log2 units
    l = jnp.array([[[[1.0], [0.0], [3.0]]]])
    got = fn(o, m, l)  # weights 0.5, 0, 1 after the max (1) is taken out
    np.testing.assert_allclose(got[0, 0, 0], (0.5 * np.array([2.0, 4.0]) + [6.0, 2.0]) / (0.5 + 3.0), rtol=1e-6)
    empty = fn(jnp.zeros_like(o), jnp.full_like(m, fd._MASKED), jnp.zeros_like(l))
    assert np.all(np.asarray(empty) == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits, rows, head_dim", [(9, 4, 128), (132, 3, 64), (16, 32, 128), (1, 8, 64)])
def test_combine_kernel_matches_reference(splits, rows, head_dim, mode):
    """The one-launch combine against its plain-JAX twin on random partials (split counts
    that are not powers of two, a row with every split empty, splits that saw nothing),
    in float32 and in bf16 as flash_decode returns it."""
    rng = np.random.default_rng(splits * rows)
    shape = (2, 3, splits, rows)
    m = rng.normal(0, 8, shape).astype(np.float32)
    m[rng.random(shape) < 0.3] = fd._MASKED  # splits past the visible range
    m[0, 0, :, 0] = fd._MASKED  # a padding row: no split saw it
    l = np.where(m == fd._MASKED, 0, rng.uniform(0.5, 64, shape)).astype(np.float32)
    o = (rng.normal(0, 1, (*shape, head_dim)) * l[..., None]).astype(np.float32)
    want = fd.combine_splits_reference(o, m, l)
    got = fd.combine_splits(o, m, l, jnp.float32, interpret=mode == "interpret")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got[0, 0, 0]) == 0)
    got_bf16 = fd.combine_splits(o, m, l, jnp.bfloat16, interpret=mode == "interpret")
    assert got_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got_bf16, got.astype(jnp.bfloat16))  # the f32 result, rounded once


def _stale(store: kv_cache.Store, keep: np.ndarray, seed: int) -> kv_cache.Store:
    """The store with every slot outside `keep` [B, S] overwritten: words with random bits,
    scales and zero points with NaN (arrays indexed by slot only; a Kivi4 store's
    per-group scales and residual stay)."""
    rng = np.random.default_rng(seed)
    b, s = keep.shape
    axis = 1 if isinstance(store, kv_cache.Dense) else 2  # the slot axis: dense token-major, the rest head-major

    def spoil(x):
        x = np.asarray(x)
        if x.ndim <= axis or x.shape[0] != b or x.shape[axis] != s:
            return x
        stale = np.expand_dims(keep == 0, [i for i in range(1, x.ndim) if i != axis])  # [B, 1.., S, 1..]
        if np.issubdtype(x.dtype, np.integer):
            junk = rng.integers(0, np.iinfo(x.dtype).max, x.shape, dtype=x.dtype, endpoint=True)
        else:
            junk = np.full(x.shape, np.nan, x.dtype)
        return np.where(stale, junk, x)

    return jax.tree.map(lambda x: jnp.asarray(spoil(x)), store)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked_words", [0, 1])
@pytest.mark.parametrize("kv_format, window", [("int8", None), ("int4-g64", 40), ("k8v4-g32", None),
                                               ("kivi4-g32", 40)])
def test_stale_slots_drop_out(kv_format: str, window: int | None, masked_words: int, mode: str):
    """Slots no query sees (past its position, before its window) may hold anything, as
    in a reused cache: with their words random and their scales NaN, the output is the
    same as with the real values there, bit for bit (the same kernel for both)."""
    b, s, kv_heads, h, d = 2, 256, 2, 8, 128
    pos = np.array([150, 70], np.int32)
    k, v = make_stores(kv_format, *random_kv((b, s, kv_heads, d), 11), jnp.asarray(pos + 1))
    q = jnp.asarray(np.random.default_rng(12).standard_normal((b, h, d)), jnp.bfloat16)
    slot = np.arange(s)[None, :]
    keep = (slot <= pos[:, None]) & (slot > pos[:, None] - (window or s))  # [B, S]
    kw = dict(block_s=32, num_splits=3, sliding_window=window, masked_words=masked_words, interpret=mode == "interpret")
    stale_k, stale_v = _stale(k, keep, 1), _stale(v, keep, 2)
    for fresh, stale in ((k, stale_k), (v, stale_v)):  # the words (and scales) outside keep really changed
        assert not np.array_equal(np.asarray(jax.tree.leaves(fresh)[0]), np.asarray(jax.tree.leaves(stale)[0]))
    want = fd.flash_decode(q, k, v, pos, **kw)
    got = fd.flash_decode(q, stale_k, stale_v, pos, **kw)
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("kv_format", ["int8", "int4-g32", "k8v4-g64"])
def test_scales_in_their_block_equal_scales_ahead(kv_format):
    """The `scales_ahead` knob only moves the scale loads: the same outputs up to one bf16
    rounding (XLA may sum in another order; interpret mode): a bf16 ulp is at most 2^-7
    of the value. Both settings lower."""
    b, s, kv_heads, h, d = 2, 200, 2, 8, 128
    k, v = make_stores(kv_format, *random_kv((b, s, kv_heads, d), 7))
    q = jnp.asarray(np.random.default_rng(8).standard_normal((b, h, d)), jnp.bfloat16)
    pos = np.array([199, 77], np.int32)
    ahead, in_block = (np.asarray(fd.flash_decode(q, k, v, pos, block_s=32, num_splits=2, scales_ahead=a,
                                                  interpret=True).astype(jnp.float32)) for a in (1, 0))
    np.testing.assert_allclose(in_block, ahead, rtol=2.0**-7, atol=2.0**-16)
    _assert_lowers(kv_format, 1, 32768, 32, 8, 128, scales_ahead=0)


def test_default_num_splits_fill_the_gpu():
    # 1 x 8 programs per split need 66 splits for 4 programs per SM on 132 SMs.
    assert fd.default_num_splits(1, 8, 131072, 128) == 66
    assert fd.default_num_splits(8, 8, 131072, 128) == 9
    # ... but never fewer than 2 blocks per split at the full cache length.
    assert fd.default_num_splits(1, 8, 8192, 128) == 32
    assert fd.default_num_splits(4, 2, 100, 128) == 1
    # Quantized on both sides: at most one wave of 5 (int8) or, at 64-slot blocks, 8 (int4)
    # programs per SM.
    for kind, splits, per_sm in (("int8", (82, 10), 5), ("int4", (132, 16), 8)):
        for batch, want in zip((1, 8), splits):
            cfg = fd.default_config(kind, kind, batch, 8, 131072)
            assert cfg.num_splits == want and cfg.block_s == 64
            assert batch * 8 * cfg.num_splits <= fd.NUM_SMS * per_sm
    assert fd.default_config("int8", "int4", 1, 8, 131072).num_splits == 66  # mixed: as bf16
    # kivi4 keys: 6 programs per SM at 64-slot blocks, 4 at 128.
    assert [fd.default_config("kivi4", "int4", b, 8, 131072, 64).num_splits for b in (1, 8)] == [99, 12]
    assert [fd.default_config("kivi4", "int4", b, 8, 131072, 128).num_splits for b in (1, 8)] == [66, 8]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q_dtype=jnp.float32), "bfloat16 or float16"),
        (dict(h=12, kv_heads=8), "not a multiple"),
        (dict(pos_shape=(3,)), "q_positions"),
        (dict(block_s=48), "power of two"),
        (dict(v_len=32), "different shapes"),
        (dict(head_dim=96), "head_dim"),
    ],
)
def test_bad_inputs_raise(change, match):
    b, s, kv_heads, h, d = 2, 64, change.get("kv_heads", 2), change.get("h", 4), change.get("head_dim", 64)
    q = jnp.zeros((b, h, d), change.get("q_dtype", jnp.bfloat16))
    k = kv_cache.Dense(jnp.zeros((b, s, kv_heads, d), jnp.bfloat16))
    v = kv_cache.Dense(jnp.zeros((b, change.get("v_len", s), kv_heads, d), jnp.bfloat16))
    pos = jnp.zeros(change.get("pos_shape", (b,)), jnp.int32)
    with pytest.raises(ValueError, match=match):
        fd.flash_decode(q, k, v, pos, block_s=change.get("block_s"), interpret=True)
    if "pos_shape" not in change and "block_s" not in change:
        assert not fd.supports(q, k, v)


def test_supports():
    q = jnp.zeros((2, 8, 64), jnp.bfloat16)
    x = jnp.zeros((2, 16, 2, 64))
    assert fd.supports(q, make_store("int8", x, 64), make_store("int4", x, 32))
    assert not fd.supports(q, kv_cache.Dense(x), kv_cache.Dense(x))  # fp32 cache


def test_kivi4_keys_only_and_a_group_a_block():
    """A Kivi4 store is taken as K (whole token groups, head_dim >= 64), not as V, and its
    blocks are its token groups: another block_s is refused, naming it."""
    b, s, kv_heads, d = 2, 64, 2, 64
    x = jnp.asarray(np.random.default_rng(3).standard_normal((b, s, kv_heads, d)), jnp.float32)
    kivi, int4 = make_store("kivi4", x, 32, jnp.array([40, 7])), make_store("int4", x, 32)
    q = jnp.zeros((b, 4 * kv_heads, d), jnp.bfloat16)
    assert fd.supports(q, kivi, int4)
    assert not fd.supports(q, int4, kivi)
    pos = jnp.array([39, 6], jnp.int32)
    with pytest.raises(ValueError, match="block_s=64"):
        fd.flash_decode(q, kivi, int4, pos, block_s=64, interpret=True)
    with pytest.raises(ValueError, match="read as K"):
        fd.flash_decode(q, int4, kivi, pos, interpret=True)


# ----------------------------------------------------------------------------- lowering

FORMATS = ("bf16", "fp16", "int8", "int4-g32", "int4-g64", "int4-g128", "k8v4", "k4v8", "kivi4-g32", "kivi4-g64",
           "kivi4-g128")


def _assert_lowers(kv_format: str, batch: int, max_len: int, heads: int, kv_heads: int, head_dim: int, **knobs):
    if kv_format.startswith("kivi4"):  # its caches hold whole token groups (kv_cache.create rounds up)
        max_len = -(-max_len // 128) * 128
    shape = (batch, max_len, kv_heads, head_dim)
    stores = jax.eval_shape(lambda: make_stores(kv_format, jnp.zeros(shape), jnp.zeros(shape)))
    leaves, tree = jax.tree.flatten(stores)
    q_dtype = jnp.float16 if kv_format == "fp16" else jnp.bfloat16

    def fn(q, pos, *leaves):
        k, v = jax.tree.unflatten(tree, leaves)
        return fd.flash_decode(q, k, v, pos, **knobs)

    q = jax.ShapeDtypeStruct((batch, heads, head_dim), q_dtype)
    pos = jax.ShapeDtypeStruct((batch,), jnp.int32)
    assert_lowers_to_triton(fn, q, pos, *leaves)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_defaults_lower_to_triton(kv_format, head_dim):
    """The shipped defaults for Llama-3.x shapes (32 query heads, 8 KV heads) at the
    sweep's batch sizes and lengths; a cache length no block size divides; a window; the
    transposed orientation (its N = 8 dots)."""
    for batch, max_len in ((1, 32768), (8, 131072), (1, 1000)):
        _assert_lowers(kv_format, batch, max_len, 32, 8, head_dim)
    _assert_lowers(kv_format, 2, 4096, 32, 8, head_dim, sliding_window=1024)
    _assert_lowers(kv_format, 1, 32768, 32, 8, head_dim, transposed=1)


@pytest.mark.parametrize("kv_format", ["bf16", "int8", "int4-g64", "kivi4-g64"])
@pytest.mark.parametrize("t", [2, 5, 8])
def test_several_queries_lower_to_triton(kv_format, t):
    """The 8B verify (T = 5 or 8 queries x 4 heads) and the 1B draft's catch-up step (T = 2)."""
    shape = (1, 4096, 8, 128)
    stores = jax.eval_shape(lambda: make_stores(kv_format, jnp.zeros(shape), jnp.zeros(shape)))
    leaves, tree = jax.tree.flatten(stores)

    def fn(q, pos, *leaves):
        return fd.flash_decode(q, *jax.tree.unflatten(tree, leaves), pos)

    assert_lowers_to_triton(fn, jax.ShapeDtypeStruct((1, t, 32, 128), jnp.bfloat16),
                            jax.ShapeDtypeStruct((1, t), jnp.int32), *leaves)


@pytest.mark.parametrize("block_s", [64, 128, 256])
def test_tuning_grid_lowers_to_triton(block_s):
    """The block sizes of the GPU tuning grid, for the formats the sweep measures."""
    for kv_format in ("bf16", "int8", "int4"):
        for num_warps, num_stages in ((4, 3), (8, 2)):
            _assert_lowers(kv_format, 1, 32768, 32, 8, 128, block_s=block_s, num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------ PTX

def _emulate_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Runs the few PTX instructions the kernel's conversions use on 32-bit registers
    (`inputs`: the asm's input operands, e.g. {"$2": word}); returns every register."""
    regs = dict(inputs)

    def val(x):
        return regs[x] if x in regs else int(x, 16) & 0xFFFFFFFF

    for line in asm.replace("{", "").replace("}", "").split(";"):
        parts = line.replace(",", " ").split()
        if not parts or parts[0] == ".reg":
            continue
        op, dst, *src = parts
        a = [val(x) for x in src]
        if op == "mov.b32":
            regs[dst] = a[0]
        elif op == "xor.b32":
            regs[dst] = a[0] ^ a[1]
        elif op == "and.b32":
            regs[dst] = a[0] & a[1]
        elif op == "lop3.b32":  # bit i of dst = bit (4 a_i + 2 b_i + c_i)... of the LUT, with a=F0, b=CC, c=AA
            lut = a[3]
            regs[dst] = sum(((lut >> ((a[0] >> i & 1) << 2 | (a[1] >> i & 1) << 1 | (a[2] >> i & 1))) & 1) << i
                            for i in range(32))
        elif op == "prmt.b32":  # default mode: byte i of dst = byte sel_i of {b, a}
            pool = a[0].to_bytes(4, "little") + a[1].to_bytes(4, "little")
            regs[dst] = int.from_bytes(bytes(pool[(a[2] >> (4 * i)) & 7] for i in range(4)), "little")
        elif op == "sub.f16x2":
            x, y = (np.array([v], np.uint32).view(np.float16) for v in a[:2])
            regs[dst] = int((x - y).view(np.uint32)[0])
        else:
            raise NotImplementedError(op)
    return regs


def _fp16x2(*words: int) -> np.ndarray:
    return np.array(words, np.uint32).view(np.float16)


def test_ptx_int4_word_conversion_exact():
    """Quarter e's PTX turns nibble e of each of two 16-bit words (packed in one register,
    the first in the low half) into an fp16x2 subnormal, n (even e) or 16 n (odd e, masked
    in place) times INT4_UNIT = 2^-24, exactly, for every nibble value in every position;
    quarters 2 and 3 read the words' high bytes (PTX_INT4_HIGH_BYTES) first."""
    for v in range(16):  # nibble e of the first word is v + e, of the second v + e + 8 (mod 16)
        a = sum(((v + e) % 16) << (4 * e) for e in range(4))
        b = sum(((v + e + 8) % 16) << (4 * e) for e in range(4))
        high = _emulate_ptx(fd.PTX_INT4_HIGH_BYTES, {"$1": a | b << 16})["$0"]
        for e in range(4):
            want = np.array([(v + e) % 16, (v + e + 8) % 16], np.float32) * (16 if e % 2 else 1) * fd.INT4_UNIT
            got = _fp16x2(_emulate_ptx(fd.PTX_INT4_NIBBLES_TO_FP16[e % 2], {"$1": high if e >= 2 else a | b << 16})["$0"])
            np.testing.assert_array_equal(got, want.astype(np.float16))
            assert np.all(got.astype(np.float32) == want)  # exact: fp16 subnormals are multiples of 2^-24


def test_ptx_int8_word_conversion_exact():
    """Quarter c's asm turns byte c of each of two words into an fp16x2 (first word's in
    the low half), exactly as int8 (and INT8_BIAS + that, biased), for every byte value
    in every byte position."""
    for v in range(256):  # byte c of a is v + c, of b v + c + 128 (mod 256): every value everywhere
        a = ((v + np.arange(4)) % 256).astype(np.uint8)
        b = a + np.uint8(128)
        words = {"$1": int(a.view(np.uint32)[0]), "$2": int(b.view(np.uint32)[0])}
        for c in range(4):
            want = np.array([a[c], b[c]], np.uint8).view(np.int8).astype(np.float16)
            got = _fp16x2(_emulate_ptx(fd.PTX_INT8_WORDS_TO_FP16[c], words)["$0"])
            np.testing.assert_array_equal(got, want)
            biased = _fp16x2(_emulate_ptx(fd.PTX_INT8_WORDS_TO_BIASED_FP16[c], words)["$0"])
            np.testing.assert_array_equal(biased, want.astype(np.float32) + fd.INT8_BIAS)
