"""Sparsity patterns: tables against token masks, every pattern through the router's
Pallas kernel (interpret mode on the CPU, compiled on a GPU) and XLA path against a dense
softmax over the pattern's own token mask, multi-scale against its reference, and the
router's decisions."""

from __future__ import annotations

import json
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import patterns as P
from ollm_jax import router
from pallas_kernels import multiscale

# Shapes: (batch, T, S, H, K, D, q_offset, lengths). T, S not multiples of the blocks.
CASES = {
    "gqa4-d64-offset-ragged": (2, 70, 100, 4, 1, 64, 30, (100, 81)),
    "gqa8-d128": (1, 64, 64, 8, 1, 128, 0, None),
    "mha-d64-chunk-ragged": (2, 40, 130, 2, 2, 64, 90, (130, 111)),
}
BLOCKS = dict(block_q=32, block_k=16)  # small tiles: many full, partial, cut and skipped blocks

PATTERNS = {
    "dense": (lambda h: P.DenseCausal(), ("gqa4-d64-offset-ragged", "gqa8-d128", "mha-d64-chunk-ragged")),
    "window": (lambda h: P.SlidingWindow(37), ("gqa4-d64-offset-ragged", "mha-d64-chunk-ragged")),
    "sinks": (lambda h: P.SinksWindow(4, 24), ("gqa8-d128", "mha-d64-chunk-ragged")),
    "strided": (lambda h: P.Strided(window=20, period=32, width=8), ("gqa4-d64-offset-ragged", "gqa8-d128")),
    "dilated": (lambda h: P.Dilated(window=12, dilation=3), ("gqa4-d64-offset-ragged", "mha-d64-chunk-ragged")),
    "longformer": (lambda h: P.Longformer(16, (2, 40, 95)), ("gqa8-d128", "mha-d64-chunk-ragged")),
    "bigbird": (lambda h: P.BigBird(window=16, num_global=8, num_random=2, block=16, seed=3),
                ("gqa4-d64-offset-ragged", "gqa8-d128")),
    "per-head": (lambda h: P.PerHead(tuple(P.BigBird(8 + 4 * i, 4, 1, 16, seed=i) if i % 2
                                          else P.SlidingWindow(8 + 4 * i) for i in range(h))),
                 ("gqa4-d64-offset-ragged", "mha-d64-chunk-ragged")),
}
RUNS = [(p, c) for p, (_, cases) in PATTERNS.items() for c in cases]


def _inputs(case: str, salt: str, dtype=jnp.bfloat16):
    b, t, s, h, kh, d, off, lengths = CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{case}/{salt}".encode()))
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, t, h, d), (b, s, kh, d), (b, s, kh, d)))
    return q, k, v, off, None if lengths is None else jnp.asarray(lengths, jnp.int32)


def dense_softmax(q, k, v, mask, lengths):
    """The oracle: float64 numpy softmax over the token mask ([T, S] or [H, T, S]).
    Returns (out [B, T, H, D], visible [B, T, H]: rows with at least one visible key)."""
    q, k, v = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    s, g = k.shape[1], h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [B, S, H, D]
    m = np.broadcast_to(mask if mask.ndim == 3 else mask[None], (h, t, s))[None]  # [1, H, T, S]
    length = np.full(b, s) if lengths is None else np.asarray(lengths)
    m = m & (np.arange(s) < length[:, None, None, None])  # [B, H, T, S]
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    scores = np.where(m, scores, -np.inf)
    mx = np.max(scores, axis=-1, keepdims=True)
    w = np.exp(scores - np.where(np.isfinite(mx), mx, 0))
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshd->bthd", w, v), m.any(-1).transpose(0, 2, 1)


def _assert_close(out, ref, visible, atol=2e-2):
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    err = np.abs(out - ref)[visible]
    assert err.size and err.max() < atol, f"max |err| {err.max():.4f} over {err.size} values"


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("name", [*PATTERNS, "multiscale", "multiscale-3"])
@pytest.mark.parametrize("shape", [(100, 100, 0, 32, 16), (77, 200, 123, 16, 32), (130, 300, 170, 64, 64)])
def test_tables_reproduce_token_mask(name, shape):
    t, s, off, bq, bk = shape
    pat = {"multiscale": P.MultiScale(24, (4, 16)), "multiscale-3": P.MultiScale(16, (2, 8, 32), (20, 40))}.get(name)
    pat = pat or PATTERNS[name][0](3)
    tables = pat.block_tables(t, s, bq, bk, off)
    mask = pat.token_mask(t, s, off)
    mask = mask if mask.ndim == 3 else mask[None]
    rebuilt = np.zeros((tables.num_heads, tables.num_q_blocks * bq, tables.num_k_blocks * bk), bool)
    for h in range(tables.num_heads):
        for i in range(tables.num_q_blocks):
            rows = slice(i * bq, (i + 1) * bq)
            full = tables.full_idx[h, i, : tables.full_cnt[h, i]]
            part = tables.part_idx[h, i, : tables.part_cnt[h, i]]
            assert np.all(np.diff(full) > 0) and np.all(np.diff(part) > 0), "lists must be ascending"
            assert not set(full) & set(part)
            for j in full:
                rebuilt[h, rows, j * bk:(j + 1) * bk] = True
            for j, tile in zip(part, tables.part_tile[h, i, : tables.part_cnt[h, i]]):
                rebuilt[h, rows, j * bk:(j + 1) * bk] = tables.tiles[tile] != 0
    np.testing.assert_array_equal(rebuilt[:, :t, : tables.seq_k], mask)
    assert tables.kept_elements == mask.sum()
    # Partial blocks really are partial over their valid part.
    assert pat.block_tables(t, s, bq, bk, off) is tables, "tables are cached per shape"


def test_anchors_strided_pattern():
    pat = P.anchors_strided()
    m = pat.token_mask(2048, 2048)
    p, s = 1500, np.arange(2048)
    want = (s <= p) & ((p - s < 256) | (s % 1024 < 128))
    np.testing.assert_array_equal(m[p], want)
    tables = pat.block_tables(16384, 16384, 128, 64)
    assert tables.density < 0.1 and tables.partial_fraction < 0.2


@pytest.mark.parametrize("pat", [P.DenseCausal(), P.SlidingWindow(37), P.SinksWindow(4, 24), P.anchors_strided(),
                                 P.Strided(20, 24, 8), P.Dilated(12, 3), P.Dilated(8, 4)], ids=P.describe)
def test_kernel_mask_is_the_mask(pat):
    """The kernel's formula (per-row/per-column parts, integer ops) equals `mask`; the
    tables of such patterns carry it, the others load tiles."""
    assert pat.in_kernel_mask
    p = jnp.arange(1000, 1130, dtype=jnp.int32)[:, None]  # [bq, 1]
    s = jnp.arange(0, 1300, dtype=jnp.int32)[None, :]  # [1, bk]
    got = pat.kernel_mask(p, s)
    got = jnp.broadcast_to(True if got is None else got, (130, 1300))
    np.testing.assert_array_equal(np.asarray(got), pat.mask(np.asarray(p), np.asarray(s)))
    assert pat.block_tables(64, 64, 16, 16).formula == pat
    for other in (P.BigBird(16), P.Longformer(16), P.MultiScale(24), P.PerHead((P.SlidingWindow(8),))):
        assert not other.in_kernel_mask and other.block_tables(64, 64, 16, 16).formula is None


def test_sliding_window_is_mistral():
    m = P.SlidingWindow(4).token_mask(8, 8)
    assert m[6].tolist() == [False, False, False, True, True, True, True, False]


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("name,case", RUNS)
def test_pattern_against_dense_softmax(name, case, impl):
    q, k, v, off, lengths = _inputs(case, name)
    pat = PATTERNS[name][0](q.shape[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to the reference
        out = router.attention(q, k, v, pattern=pat, impl=impl, q_offset=off, lengths=lengths, **BLOCKS)
    ref, visible = dense_softmax(q, k, v, pat.token_mask(q.shape[1], k.shape[1], off), lengths)
    _assert_close(out, ref, visible)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("case", ["gqa4-d64-offset-ragged", "gqa8-d128"])
def test_multiscale_against_reference(case, impl):
    q, k, v, off, lengths = _inputs(case, "multiscale")
    pat = P.MultiScale(window=12, pools=(4, 16), spans=(16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = router.attention(q, k, v, pattern=pat, impl=impl, q_offset=off, lengths=lengths, **BLOCKS)
    ref = multiscale.multiscale_reference(q, k, v, window=12, pools=(4, 16), spans=(16,), q_offset=off,
                                          lengths=lengths)
    # Rows whose own position is a valid key see at least their window.
    visible = (off + np.arange(q.shape[1]))[None, :] < (k.shape[1] if lengths is None else np.asarray(lengths)[:, None])
    _assert_close(out, np.asarray(ref.astype(jnp.float32)), np.broadcast_to(visible[:, :, None], out.shape[:3]))


def test_multiscale_partitions_the_past():
    """Every earlier key is represented exactly once: at full resolution or in one summary."""
    pat = P.MultiScale(window=10, pools=(2, 8), spans=(12,))
    t = s = 90
    m = pat.token_mask(t, s)  # [T, S']
    offs = pat.level_offsets(s)
    cover = m[:, offs[0]:].astype(int)  # [T, S] full resolution
    for j, pool in enumerate(pat.pools, start=1):
        n = s // pool
        cover[:, : n * pool] += np.repeat(m[:, offs[j]: offs[j] + n], pool, axis=1)
    np.testing.assert_array_equal(cover, np.tril(np.ones((t, s), int)))
    # window + P_1 - 1 full-resolution keys, about span / P_1 + 1 level-1 chunks, S / P_2 level-2 ones.
    assert m.sum(1).max() <= 10 + 1 + (12 + 8) // 2 + 90 // 8


def test_multiscale_equals_window_when_nothing_is_old():
    """Queries within the window see exactly the causal prefix at full resolution."""
    q, k, v, _, _ = _inputs("gqa8-d128", "ms-short")
    out = multiscale.multiscale_reference(q, k, v, window=64, pools=(4, 16), spans=(16,))
    ref, vis = dense_softmax(q, k, v, P.DenseCausal().token_mask(64, 64), None)
    _assert_close(out, ref, vis)


# ----------------------------------------------------------------------------- router


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU routing")
def test_auto_is_xla_on_cpu():
    q, k, _, _, _ = _inputs("gqa8-d128", "router")
    impl, why = router.choose(P.SlidingWindow(8), q, k)
    assert impl == "xla" and "cpu" in why


def test_auto_reads_the_measured_table(monkeypatch, tmp_path):
    q, k, _, _, _ = _inputs("gqa8-d128", "router")
    table = {"entries": [
        {"card": "h200", "pattern": "DenseCausal", "head_dim": 128, "seq_len": 16384, "best": "pallas",
         "times_ms": {"pallas": 3.9, "cudnn": 4.0}},
        {"card": "h200", "pattern": "DenseCausal", "head_dim": 128, "seq_len": 64, "best": "cudnn",
         "times_ms": {"pallas": 0.1, "cudnn": 0.05}},
    ]}
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setenv("OLLM_ROUTER_TABLE", str(tmp_path / "t.json"))
    monkeypatch.setattr(router, "on_gpu", lambda: True)
    monkeypatch.setattr(router, "card", lambda: "h200")
    router.load_table.cache_clear()
    try:
        assert router.choose(P.DenseCausal(), q, k)[0] == "cudnn"  # S=64: nearest entry
        big_k = jax.ShapeDtypeStruct((1, 12000, 1, 128), jnp.bfloat16)
        impl, why = router.choose(P.DenseCausal(), q, big_k)
        assert impl == "pallas" and "router table" in why
        # No entry: cuDNN for windows, Pallas for block-sparse; cuDNN never with an offset.
        assert router.choose(P.SlidingWindow(8), q, k)[0] == "cudnn"
        assert router.choose(P.anchors_strided(), q, k)[0] == "pallas"
        assert router.choose(P.SlidingWindow(8), q, k, q_offset=5)[0] == "pallas"
    finally:
        router.load_table.cache_clear()


def test_unrunnable_impl_falls_back_with_a_warning():
    q, k, v, off, lengths = _inputs("gqa4-d64-offset-ragged", "fallback")
    pat = P.SlidingWindow(20)
    with pytest.warns(UserWarning, match="cudnn"):
        out = router.attention(q, k, v, pattern=pat, impl="cudnn", q_offset=off, lengths=lengths)
    ref, vis = dense_softmax(q, k, v, pat.token_mask(q.shape[1], k.shape[1], off), lengths)
    _assert_close(out, ref, vis)
    with pytest.warns(UserWarning, match="dtype"):  # the kernel takes bf16/fp16 only
        router.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), pattern=pat,
                         impl="pallas")


def test_traced_offset_runs_table_patterns_on_xla():
    q, k, v, _, lengths = _inputs("gqa4-d64-offset-ragged", "traced")
    pat = P.BigBird(16, 8, 2, 16)
    fn = jax.jit(lambda q, k, v, off: router.attention(q, k, v, pattern=pat, q_offset=off, lengths=lengths))
    out = fn(q, k, v, 30)
    ref, vis = dense_softmax(q, k, v, pat.token_mask(q.shape[1], k.shape[1], 30), lengths)
    _assert_close(out, ref, vis)


@pytest.mark.parametrize("name,impl", [("bigbird", "xla"), ("window", "pallas")])
def test_per_sequence_offsets(name, impl):
    """Decode-style [B] query offsets (each sequence at its own position)."""
    q, k, v, _, lengths = _inputs("gqa4-d64-offset-ragged", "per-seq")
    q = q[:, :3]
    offsets = jnp.asarray([97, 78], jnp.int32)  # the last valid positions of the two sequences
    pat = PATTERNS[name][0](q.shape[2])
    out = router.attention(q, k, v, pattern=pat, impl=impl, q_offset=offsets, lengths=lengths, **BLOCKS)
    for b in range(2):
        off = int(offsets[b])
        ref, vis = dense_softmax(q[b:b + 1], k[b:b + 1], v[b:b + 1], pat.token_mask(3, k.shape[1], off),
                                 lengths[b:b + 1])
        _assert_close(out[b:b + 1], ref, vis)


def test_sparsity_notebook_executes():
    """notebooks/sparsity_patterns.ipynb runs top to bottom (CPU, small sizes, stories260K)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from tests.conftest import REPO, STORIES260K, require

    require(STORIES260K, "stories260K")
    nb = nbformat.read(REPO / "notebooks" / "sparsity_patterns.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "max |logit difference| vs the model's own attention" in text and "notebook ran in" in text
