"""Attention sparsity patterns: which keys each query sees, as a token mask and as block tables.

A pattern is a frozen (hashable) dataclass. Every pattern answers two questions:

  token_mask(T, S, q_offset)                     -> bool [T, S]  (tests, plots, XLA)
  block_tables(T, S, block_q, block_k, q_offset) -> BlockTables  (the Pallas kernel)

Query i of a chunk is at absolute position `q_offset + i`; key s is at position s (the
KV cache holds positions 0..S-1). Both results are cached per shape
(`functools.lru_cache`), and the tables are numpy int32 built on the host once, so
building them never shows up in a profile.

Every pattern except `MultiScale` is *causal and the union of terms*:

  visible(p, s) = s <= p  and  (term_1(p, s) or term_2(p, s) or ...)

| pattern          | terms                                                            |
| ---------------- | ---------------------------------------------------------------- |
| DenseCausal      | everything                                                       |
| SlidingWindow(w) | p - w < s  (Mistral: key s visible to query p iff p-w < s <= p)   |
| SinksWindow      | s < sinks, or the window (StreamingLLM)                          |
| Strided          | the window, or (s mod period) < width: a local band plus every   |
|                  | `period/width`-th key block (Sparse Transformer, fixed columns)   |
| Dilated          | p - s = j * dilation for j < window (Longformer dilated window)  |
| Longformer       | the window, or s a global token, or p a global token             |
| BigBird          | the window, or s < num_global, or (p, s) in a seeded random      |
|                  | block pair (per query block, `num_random` earlier key blocks)     |
| PerHead          | a different pattern per query head (token mask [H, T, S])        |
| MultiScale       | a recent window at full resolution plus mean-pooled summaries of |
|                  | older keys at coarser scales (its own key axis; see the class)   |

ANCHORS.md's strided pattern ("local 256 + every key whose position mod 1024 < 128,
causal") is `Strided(window=256, period=1024, width=128)`.

## Block tables
The kernel tiles queries by `block_q` and keys by `block_k`. For each query block (and
optionally each head) the tables list the key blocks to visit, split in two:

  full blocks     every (valid query, valid key) pair visible: no element mask at all;
  partial blocks  some pairs visible: the element mask is a tile of `tiles`, given by
                  `part_tile` (tiles are deduplicated: a window's diagonal tiles repeat).

Blocks are classified analytically per term (exact for "full", conservative for "may
touch"), then every candidate partial block is evaluated exactly, so a block whose valid
part is all visible is promoted to full and an empty one is dropped. Lists are sorted
by key block, which lets the kernel split off the blocks cut by a sequence's runtime
length with one count (see `pallas_kernels.flash_prefill`).

Dimensions: T queries, S keys, H heads, nq = ceil(T / block_q), nk = ceil(S / block_k).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTables:
    """Per-query-block key-block lists for the block-sparse kernel (numpy, host).

    Ht is 1 (one table for all heads) or H (per head). Padding entries past a count
    repeat the last valid index (or 0); the kernel never reads them.
    """

    full_idx: np.ndarray  # [Ht, nq, F] int32 key blocks with no element mask, ascending
    full_cnt: np.ndarray  # [Ht, nq] int32
    part_idx: np.ndarray  # [Ht, nq, P] int32 key blocks that need the element mask, ascending
    part_tile: np.ndarray  # [Ht, nq, P] int32 index into `tiles`
    part_cnt: np.ndarray  # [Ht, nq] int32
    tiles: np.ndarray  # [n_tiles, block_q, block_k] int8 element masks (1 = visible)
    block_q: int
    block_k: int
    seq_q: int  # T
    seq_k: int  # S (the pattern's key axis; MultiScale's is longer than the cache)
    q_offset: int
    kept_elements: int  # visible (query, key) pairs summed over table heads
    # The pattern itself when its partial blocks' element masks are cheap formulas of
    # (query position, key position) that the kernel evaluates in registers instead of
    # loading a tile (`Pattern.kernel_mask`); None: the kernel loads `tiles`.
    formula: "Pattern | None" = None

    @property
    def num_heads(self) -> int:
        return self.full_idx.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.full_idx.shape[1]

    @property
    def num_k_blocks(self) -> int:
        return -(-self.seq_k // self.block_k)

    @property
    def kept_blocks(self) -> int:
        """Blocks the kernel computes, summed over table heads."""
        return int(self.full_cnt.sum() + self.part_cnt.sum())

    @property
    def density(self) -> float:
        """Fraction of the [nq, nk] block grid kept (mean over table heads)."""
        return self.kept_blocks / (self.num_heads * self.num_q_blocks * self.num_k_blocks)

    @property
    def partial_fraction(self) -> float:
        """Fraction of kept blocks that pay for the element mask."""
        return float(self.part_cnt.sum()) / max(self.kept_blocks, 1)

    def block_mask(self) -> np.ndarray:
        """[Ht, nq, nk] int8: 0 skipped, 1 partial, 2 full (for plots)."""
        out = np.zeros((self.num_heads, self.num_q_blocks, self.num_k_blocks), np.int8)
        for h in range(self.num_heads):
            for i in range(self.num_q_blocks):
                out[h, i, self.full_idx[h, i, : self.full_cnt[h, i]]] = 2
                out[h, i, self.part_idx[h, i, : self.part_cnt[h, i]]] = 1
        return out


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Block boundaries in absolute positions (inclusive last valid row/column)."""

    q_lo: np.ndarray  # [nq, 1]
    q_hi: np.ndarray  # [nq, 1]
    k_lo: np.ndarray  # [1, nk]
    k_hi: np.ndarray  # [1, nk]


def _grid(t: int, s: int, block_q: int, block_k: int, q_offset: int) -> _Grid:
    nq, nk = -(-t // block_q), -(-s // block_k)
    qi, kj = np.arange(nq, dtype=np.int64), np.arange(nk, dtype=np.int64)
    return _Grid(
        q_lo=(q_offset + qi * block_q)[:, None],
        q_hi=(q_offset + np.minimum((qi + 1) * block_q, t) - 1)[:, None],
        k_lo=(kj * block_k)[None, :],
        k_hi=(np.minimum((kj + 1) * block_k, s) - 1)[None, :],
    )


# ----------------------------------------------------------------------------- terms
# A term is one way a key can be visible. Each gives its elementwise mask (numpy or
# jax.numpy, `xp`) and, for a grid of blocks, (full, touch): full exact (every pair in
# the block visible), touch conservative (some pair may be visible). Terms with
# `in_kernel = True` also give `kernel_mask(p, s)`: the same mask written for the Pallas
# kernel (p [bq, 1] query positions, s [1, bk] key positions, int32; None = all
# visible), with the per-row and per-column parts computed on the small vectors so the
# per-element work is a compare or two.


def _band(g: _Grid, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of the diagonal band lo <= p - s <= hi."""
    d_min, d_max = g.q_lo - g.k_hi, g.q_hi - g.k_lo
    return (d_min >= lo) & (d_max <= hi), (d_max >= lo) & (d_min <= hi)


def _columns(g: _Grid, kept_before) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of a query-independent key set; kept_before(x) = #kept keys in [0, x)."""
    n = kept_before(g.k_hi + 1) - kept_before(g.k_lo)
    full, touch = n == g.k_hi - g.k_lo + 1, n > 0
    shape = (g.q_lo.shape[0], g.k_lo.shape[1])
    return np.broadcast_to(full, shape), np.broadcast_to(touch, shape)


@dataclasses.dataclass(frozen=True)
class Everything:
    in_kernel = True

    def mask(self, p, s, xp, extent):
        return xp.ones(xp.broadcast_shapes(xp.shape(p), xp.shape(s)), bool)

    def kernel_mask(self, p, s):
        return None

    def classify(self, g: _Grid):
        ones = np.ones((g.q_lo.shape[0], g.k_lo.shape[1]), bool)
        return ones, ones


@dataclasses.dataclass(frozen=True)
class Window:
    """p - s < window (combined with causality: the `window` most recent keys)."""

    window: int
    in_kernel = True

    def mask(self, p, s, xp, extent):
        return p - s < self.window

    def kernel_mask(self, p, s):
        return s > p - self.window  # [bq, 1] subtract, one compare per element

    def classify(self, g: _Grid):
        return _band(g, -math.inf, self.window - 1)


@dataclasses.dataclass(frozen=True)
class DilatedWindow:
    """p - s = j * dilation for 0 <= j < window."""

    window: int
    dilation: int
    in_kernel = True

    def mask(self, p, s, xp, extent):
        d = p - s
        return (d >= 0) & (d < self.window * self.dilation) & (d % self.dilation == 0)

    def kernel_mask(self, p, s):
        d = p - s
        if self.dilation & (self.dilation - 1) == 0:
            on_grid = (d & (self.dilation - 1)) == 0
        else:
            from jax import lax  # the kernel's integer remainder (no floor-mod select)

            on_grid = lax.rem(d, self.dilation) == 0  # d < 0 is rejected below anyway
        return (d >= 0) & (d < self.window * self.dilation) & on_grid

    def classify(self, g: _Grid):
        full, touch = _band(g, 0, self.window * self.dilation - 1)
        return full & (self.dilation == 1), touch


@dataclasses.dataclass(frozen=True)
class PeriodicColumns:
    """(s mod period) < width; period None means s < width (attention sinks)."""

    width: int
    period: int | None = None
    in_kernel = True

    def mask(self, p, s, xp, extent):
        return (s < self.width) if self.period is None else (s % self.period < self.width)

    def kernel_mask(self, p, s):  # key-only: [1, bk]
        if self.period is None:
            return s < self.width
        if self.period & (self.period - 1) == 0:
            return (s & (self.period - 1)) < self.width
        from jax import lax

        return lax.rem(s, self.period) < self.width  # s >= 0

    def classify(self, g: _Grid):
        if self.period is None:
            return _columns(g, lambda x: np.minimum(x, self.width))
        per, w = self.period, self.width
        return _columns(g, lambda x: (x // per) * w + np.minimum(x % per, w))


@dataclasses.dataclass(frozen=True)
class KeySet:
    """s in a set of positions (Longformer's global tokens, as keys)."""

    in_kernel = False  # a set or table lookup: the kernel loads mask tiles
    positions: tuple[int, ...]

    def mask(self, p, s, xp, extent):
        return xp.isin(s, xp.asarray(self.positions, dtype=np.int32))

    def classify(self, g: _Grid):
        pos = np.asarray(sorted(self.positions), np.int64)
        return _columns(g, lambda x: np.searchsorted(pos, x, side="left"))


@dataclasses.dataclass(frozen=True)
class QuerySet:
    """p in a set of positions: those queries see every (earlier) key."""

    in_kernel = False  # a set or table lookup: the kernel loads mask tiles
    positions: tuple[int, ...]

    def mask(self, p, s, xp, extent):
        return xp.isin(p, xp.asarray(self.positions, dtype=np.int32))

    def classify(self, g: _Grid):
        pos = np.asarray(sorted(self.positions), np.int64)
        n = np.searchsorted(pos, g.q_hi + 1) - np.searchsorted(pos, g.q_lo)
        shape = (g.q_lo.shape[0], g.k_lo.shape[1])
        return np.broadcast_to(n == g.q_hi - g.q_lo + 1, shape), np.broadcast_to(n > 0, shape)


@functools.lru_cache(maxsize=64)
def _random_block_matrix(num_blocks: int, num_random: int, seed: int) -> np.ndarray:
    """[n, n] bool: row i has min(num_random, i) distinct earlier blocks, seeded per row
    (so a row does not depend on n: a longer prompt extends, never reshuffles)."""
    out = np.zeros((num_blocks, num_blocks), bool)
    for i in range(1, num_blocks):
        rng = np.random.default_rng((seed, i))
        out[i, rng.choice(i, size=min(num_random, i), replace=False)] = True
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True)
class RandomBlocks:
    """(p // block, s // block) in a seeded random block set (BigBird)."""

    in_kernel = False  # a set or table lookup: the kernel loads mask tiles
    block: int
    num_random: int
    seed: int

    def _matrix(self, extent: int) -> np.ndarray:
        return _random_block_matrix(-(-extent // self.block), self.num_random, self.seed)

    def mask(self, p, s, xp, extent):
        r = xp.asarray(self._matrix(extent))
        n = r.shape[0]
        return r[xp.clip(p // self.block, 0, n - 1), xp.clip(s // self.block, 0, n - 1)]

    def classify(self, g: _Grid):
        extent = int(max(g.q_hi.max(), g.k_hi.max())) + 1
        r = self._matrix(extent).astype(np.int64)
        c = np.zeros((r.shape[0] + 1, r.shape[1] + 1), np.int64)
        c[1:, 1:] = r.cumsum(0).cumsum(1)  # 2-D prefix sums over pattern blocks
        qa, qb = g.q_lo // self.block, g.q_hi // self.block + 1  # [nq, 1]
        ka, kb = g.k_lo // self.block, g.k_hi // self.block + 1  # [1, nk]
        n = c[qb, kb] - c[qa, kb] - c[qb, ka] + c[qa, ka]
        return n == (qb - qa) * (kb - ka), n > 0


@dataclasses.dataclass(frozen=True)
class KeyRange:
    """lo(p) <= s < hi(p) with lo, hi non-decreasing in p (MultiScale's levels)."""

    in_kernel = False  # a set or table lookup: the kernel loads mask tiles
    lo: Any  # callable (p, xp) -> array; hashable (a frozen dataclass method)
    hi: Any

    def mask(self, p, s, xp, extent):
        return (s >= self.lo(p, xp)) & (s < self.hi(p, xp))

    def classify(self, g: _Grid):
        full = (g.k_lo >= self.lo(g.q_hi, np)) & (g.k_hi < self.hi(g.q_lo, np))
        touch = (g.k_hi >= self.lo(g.q_lo, np)) & (g.k_lo < self.hi(g.q_hi, np))
        return full, touch


# ----------------------------------------------------------------------------- patterns


class Pattern:
    """Base: `causal and any(terms)`. Subclasses are frozen dataclasses defining `terms`."""

    causal = True  # visible(p, s) requires s <= p
    contiguous = False  # causal + optional window: the kernel computes loop bounds, no tables

    @property
    def contiguous_window(self) -> int | None:
        """For contiguous patterns, the window (None: dense causal)."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__

    def terms(self) -> tuple:
        raise NotImplementedError

    def key_length(self, seq_k: int) -> int:
        """Length of the key axis the pattern indexes, for a cache of `seq_k` keys."""
        return seq_k

    def mask(self, p, s, xp=np, *, extent: int | None = None, seq_k: int | None = None):
        """Elementwise visibility of key s to query position p (broadcasting arrays).

        `xp` is numpy or jax.numpy; `extent` (static) bounds p and s for patterns that
        look up a table (BigBird); None reads it from numpy inputs. `seq_k` (the cache
        length) is needed only by patterns with their own key axis (MultiScale).
        """
        if extent is None:
            extent = int(max(np.max(p), np.max(s))) + 1
        vis = None
        for term in self.terms():
            m = term.mask(p, s, xp, extent)
            vis = m if vis is None else vis | m
        return (vis & (s <= p)) if self.causal else vis

    @property
    def in_kernel_mask(self) -> bool:
        """True when every term has a cheap in-kernel formula (`kernel_mask`)."""
        return all(getattr(t, "in_kernel", False) for t in self.terms())

    def kernel_mask(self, p, s, *, causal: bool = True):
        """`mask` for the Pallas kernel: p [bq, 1] and s [1, bk] int32 positions -> bool
        [bq, bk] or [1, bk] (None: every pair visible). Only when `in_kernel_mask`.
        causal=False leaves out `s <= p` (the kernel folds it into a per-row bound)."""
        vis = None
        for term in self.terms():
            m = term.kernel_mask(p, s)
            if m is None:  # this term keeps everything: the union is everything
                vis = None
                break
            vis = m if vis is None else vis | m
        if not (causal and self.causal):
            return vis
        return (s <= p) if vis is None else vis & (s <= p)

    def classify(self, g: _Grid, seq_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(full, touch) [nq, nk] bool over a block grid: full exact, touch a superset."""
        full = touch = None
        for term in self.terms():
            f, t = term.classify(g)
            full, touch = (f, t) if full is None else (full | f, touch | t)
        if self.causal:
            cf, ct = _band(g, 0, math.inf)
            full, touch = full & cf, touch & ct
        return full, touch

    def token_mask(self, seq_q: int, seq_k: int, q_offset: int = 0) -> np.ndarray:
        """bool [T, S] (`PerHead`: [H, T, S]); S is `key_length(seq_k)`. Cached, read-only."""
        return _token_mask(self, seq_q, seq_k, q_offset)

    def block_tables(self, seq_q: int, seq_k: int, block_q: int, block_k: int, q_offset: int = 0) -> BlockTables:
        """The kernel's tables for T=seq_q queries at q_offset over seq_k cache keys. Cached."""
        return _block_tables(self, seq_q, seq_k, block_q, block_k, q_offset)

    def density(self, seq_q: int, seq_k: int | None = None, q_offset: int = 0) -> float:
        """Fraction of (query, key) pairs visible (token level)."""
        seq_k = seq_q + q_offset if seq_k is None else seq_k
        t = self.block_tables(seq_q, seq_k, 64, 64, q_offset)
        return t.kept_elements / (t.num_heads * seq_q * t.seq_k)


@functools.lru_cache(maxsize=64)
def _token_mask(pattern: Pattern, seq_q: int, seq_k: int, q_offset: int) -> np.ndarray:
    p = np.arange(q_offset, q_offset + seq_q, dtype=np.int64)[:, None]
    s = np.arange(pattern.key_length(seq_k), dtype=np.int64)[None, :]
    extent = max(q_offset + seq_q, s.shape[1]) + 1
    out = np.ascontiguousarray(pattern.mask(p, s, np, extent=extent, seq_k=seq_k))
    out.setflags(write=False)
    return out


def _bucket(n: int) -> int:
    """Table widths and tile counts round up to a power of two, so patterns of one shape
    mostly share a compiled kernel (tables are data, their shapes are not)."""
    return 1 << max(0, n - 1).bit_length()


def _pad_lists(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = _bucket(max(1, max(len(x) for x in lists)))
    out = np.zeros((len(lists), width), np.int32)
    for i, x in enumerate(lists):
        if x:
            out[i, : len(x)] = x
            out[i, len(x):] = x[-1]
    return out, np.asarray([len(x) for x in lists], np.int32)


@functools.lru_cache(maxsize=256)
def _block_tables(pattern: Pattern, seq_q: int, seq_k: int, block_q: int, block_k: int, q_offset: int) -> BlockTables:
    if isinstance(pattern, PerHead):
        return _stack_heads([p.block_tables(seq_q, seq_k, block_q, block_k, q_offset) for p in pattern.patterns])
    s_len = pattern.key_length(seq_k)
    g = _grid(seq_q, s_len, block_q, block_k, q_offset)
    full, touch = pattern.classify(g, seq_k)
    full = full.copy()
    nq, nk = full.shape
    extent = max(q_offset + seq_q, s_len) + 1
    valid_rows = np.minimum(seq_q - np.arange(nq) * block_q, block_q)  # [nq]
    valid_cols = np.minimum(s_len - np.arange(nk) * block_k, block_k)  # [nk]
    r, c = np.arange(block_q), np.arange(block_k)

    # Element count of full blocks; candidates evaluated exactly below.
    kept = int((valid_rows[:, None] * valid_cols[None, :] * full).sum())
    cand_i, cand_j = np.nonzero(touch & ~full)
    part: dict[tuple[int, int], int] = {}
    tile_bytes: list[np.ndarray] = []
    chunk = max(1, (1 << 22) // (block_q * block_k))
    for lo in range(0, len(cand_i), chunk):
        ii, jj = cand_i[lo : lo + chunk], cand_j[lo : lo + chunk]
        p = (q_offset + ii * block_q)[:, None, None] + r[None, :, None]  # [n, bq, 1]
        s = (jj * block_k)[:, None, None] + c[None, None, :]  # [n, 1, bk]
        valid = (r[None, :, None] < valid_rows[ii][:, None, None]) & (c[None, None, :] < valid_cols[jj][:, None, None])
        m = pattern.mask(p, s, np, extent=extent, seq_k=seq_k) & valid  # [n, bq, bk]
        n_vis = m.sum(axis=(1, 2))
        n_valid = valid_rows[ii] * valid_cols[jj]
        for t in range(len(ii)):
            if n_vis[t] == 0:
                continue
            kept += int(n_vis[t])
            if n_vis[t] == n_valid[t]:
                full[ii[t], jj[t]] = True
            else:
                part[(int(ii[t]), int(jj[t]))] = len(tile_bytes)
                tile_bytes.append(np.packbits(m[t]))
    # Deduplicate the element masks.
    if tile_bytes:
        uniq, inverse = np.unique(np.stack(tile_bytes), axis=0, return_inverse=True)
        tiles = np.unpackbits(uniq, axis=1, count=block_q * block_k).reshape(-1, block_q, block_k).astype(np.int8)
        inverse = inverse.reshape(-1)
    else:
        tiles, inverse = np.ones((1, block_q, block_k), np.int8), np.zeros(0, np.int64)
    tiles = np.concatenate([tiles, np.zeros((_bucket(len(tiles)) - len(tiles), block_q, block_k), np.int8)])

    full_lists = [list(np.nonzero(full[i])[0]) for i in range(nq)]
    part_lists: list[list[int]] = [[] for _ in range(nq)]
    tile_lists: list[list[int]] = [[] for _ in range(nq)]
    for (i, j), t in sorted(part.items()):
        part_lists[i].append(j)
        tile_lists[i].append(int(inverse[t]))
    full_idx, full_cnt = _pad_lists(full_lists)
    part_idx, part_cnt = _pad_lists(part_lists)
    part_tile, _ = _pad_lists(tile_lists)
    return BlockTables(
        full_idx=full_idx[None], full_cnt=full_cnt[None], part_idx=part_idx[None], part_tile=part_tile[None],
        part_cnt=part_cnt[None], tiles=tiles, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=s_len,
        q_offset=q_offset, kept_elements=kept, formula=pattern if pattern.in_kernel_mask else None,
    )


def _stack_heads(tables: list[BlockTables]) -> BlockTables:
    """One BlockTables with a head axis from per-head tables (tile ids offset)."""
    t0 = tables[0]

    def pad(a: np.ndarray, width: int) -> np.ndarray:  # [1, nq, w] -> [1, nq, width], repeat last
        return np.concatenate([a, np.repeat(a[:, :, -1:], width - a.shape[2], axis=2)], axis=2)

    f_w = max(t.full_idx.shape[2] for t in tables)
    p_w = max(t.part_idx.shape[2] for t in tables)
    offsets = np.cumsum([0] + [t.tiles.shape[0] for t in tables])
    tiles = np.concatenate([t.tiles for t in tables])
    tiles = np.concatenate([tiles, np.zeros((_bucket(len(tiles)) - len(tiles), *tiles.shape[1:]), np.int8)])
    return BlockTables(
        full_idx=np.concatenate([pad(t.full_idx, f_w) for t in tables]),
        full_cnt=np.concatenate([t.full_cnt for t in tables]),
        part_idx=np.concatenate([pad(t.part_idx, p_w) for t in tables]),
        part_tile=np.concatenate([pad(t.part_tile, p_w) + o for t, o in zip(tables, offsets)]),
        part_cnt=np.concatenate([t.part_cnt for t in tables]),
        tiles=tiles,
        block_q=t0.block_q, block_k=t0.block_k, seq_q=t0.seq_q, seq_k=t0.seq_k, q_offset=t0.q_offset,
        kept_elements=sum(t.kept_elements for t in tables),
    )


@dataclasses.dataclass(frozen=True)
class DenseCausal(Pattern):
    """Every earlier key (and the query's own)."""

    contiguous = True

    def terms(self):
        return (Everything(),)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Mistral's window: key s visible to query p iff p - window < s <= p."""

    window: int
    contiguous = True

    @property
    def contiguous_window(self) -> int | None:
        return self.window

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")

    def terms(self):
        return (Window(self.window),)


@dataclasses.dataclass(frozen=True)
class SinksWindow(Pattern):
    """StreamingLLM: the first `sinks` keys (attention sinks) plus the recent window."""

    sinks: int
    window: int

    def terms(self):
        return (PeriodicColumns(self.sinks), Window(self.window))


@dataclasses.dataclass(frozen=True)
class Strided(Pattern):
    """A local band of `window` keys plus every key with (s mod period) < width.

    With period = stride * block and width = block this is "every stride-th key block";
    `Strided(256, 1024, 128)` is ANCHORS.md's pattern.
    """

    window: int
    period: int
    width: int

    @classmethod
    def every_kth_block(cls, window: int, block: int, k: int) -> "Strided":
        return cls(window=window, period=k * block, width=block)

    def terms(self):
        return (Window(self.window), PeriodicColumns(self.width, self.period))


@dataclasses.dataclass(frozen=True)
class Dilated(Pattern):
    """Longformer's dilated window: `window` keys at distances 0, d, 2d, ... (d = dilation).

    Dilation is element-level, so every block in the band pays for the element mask:
    the kernel's saving is the band's width, not the holes inside it.
    """

    window: int
    dilation: int

    def terms(self):
        return (DilatedWindow(self.window, self.dilation),)


@dataclasses.dataclass(frozen=True)
class Longformer(Pattern):
    """A sliding window plus global tokens: every query sees them, and they see every
    (earlier) key. `global_tokens` are absolute positions."""

    window: int
    global_tokens: tuple[int, ...] = (0,)

    def terms(self):
        return (Window(self.window), KeySet(tuple(self.global_tokens)), QuerySet(tuple(self.global_tokens)))


@dataclasses.dataclass(frozen=True)
class BigBird(Pattern):
    """A sliding window, the first `num_global` tokens as global keys, and for every query
    block of `block` tokens `num_random` seeded random earlier key blocks.

    (With causality, the first tokens seeing everything earlier is already implied.)
    For random blocks that differ per head use `PerHead` with one seed per head.
    """

    window: int
    num_global: int = 64
    num_random: int = 3
    block: int = 64
    seed: int = 0

    def terms(self):
        return (
            Window(self.window),
            PeriodicColumns(self.num_global),
            RandomBlocks(self.block, self.num_random, self.seed),
        )


@dataclasses.dataclass(frozen=True)
class PerHead(Pattern):
    """One pattern per query head; token masks are [H, T, S], tables have a head axis."""

    patterns: tuple[Pattern, ...]

    def __post_init__(self):
        if any(isinstance(p, (PerHead, MultiScale)) for p in self.patterns):
            raise ValueError("PerHead takes plain patterns (no PerHead or MultiScale inside)")

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    @property
    def in_kernel_mask(self) -> bool:
        return False  # one kernel serves every head: per-head tiles

    def mask(self, p, s, xp=np, *, extent=None, seq_k=None):
        return xp.stack([pat.mask(p, s, xp, extent=extent, seq_k=seq_k) for pat in self.patterns])


# ----------------------------------------------------------------------------- multi-scale


@dataclasses.dataclass(frozen=True)
class MultiScale(Pattern):
    """Multi-scale attention: full resolution nearby, mean-pooled summaries further back.

    Levels 1..L pool keys and values in non-overlapping chunks of `pools[j-1]` tokens
    (each pool a multiple of the previous one; the mean of the chunk's post-RoPE keys and
    of its values). For a query at position p the key positions [0, p] are partitioned:

      a_0 = floor(max(0, p - window + 1) / P_1) * P_1    full resolution: keys [a_0, p]
      a_j = floor(max(0, a_{j-1} - spans[j-1]) / P_{j+1}) * P_{j+1}   (j = 1..L-1)
      a_L = 0
      level j (pool P_j) covers [a_j, a_{j-1}): its chunks c with a_j <= c*P_j < a_{j-1}

    so each key is represented exactly once, only causally complete chunks are seen
    (every chunk ends before a_0 <= p), the full-resolution window holds between
    `window` and `window + P_1 - 1` keys, and level j < L covers about `spans[j-1]` keys.
    Cost per query: O(window + sum(spans[j]/P_j) + S/P_L), i.e. O(T * (w + S/p)).

    Weighting: a summary's score is q . mean(k) * scale + log(P_j), so it carries the
    softmax mass of its P_j keys as if they all had the mean key (exact when they do);
    its value is the mean value.

    The kernel sees one concatenated key axis (`key_length`), coarsest level first:

      [level L chunks (S // P_L) | ... | level 1 chunks (S // P_1) | the S cache keys]

    so a sequence's valid keys are still a prefix (length + sum of chunk counts). This
    pattern's `mask`, `token_mask` and `block_tables` index that axis; `key_bias(S)` is
    the per-key log(P_j) bias. `pallas_kernels.multiscale` pools K/V and holds the
    plain-JAX reference.
    """

    window: int
    pools: tuple[int, ...] = (4, 16)
    spans: tuple[int, ...] | None = None  # default: 4 * window for each level but the last

    causal = False  # the level-0 range already ends at p

    @property
    def in_kernel_mask(self) -> bool:
        return False  # level boundaries: tiles

    def __post_init__(self):
        if not self.pools or any(b % a for a, b in zip(self.pools, self.pools[1:])):
            raise ValueError(f"pools={self.pools} must be non-empty, each a multiple of the previous")
        if len(self.spans_) != len(self.pools) - 1:
            raise ValueError(f"spans={self.spans} needs {len(self.pools) - 1} entries for pools={self.pools}")

    @property
    def spans_(self) -> tuple[int, ...]:
        return self.spans if self.spans is not None else (4 * self.window,) * (len(self.pools) - 1)

    def num_chunks(self, seq_k: int) -> tuple[int, ...]:
        """Chunks per level (level 1 first); a trailing partial chunk is dropped (never
        complete before a query in the cache)."""
        return tuple(seq_k // p for p in self.pools)

    def level_offsets(self, seq_k: int) -> tuple[int, ...]:
        """Start of each level on the concatenated axis: (level 0 = full res, 1, ..., L)."""
        n = self.num_chunks(seq_k)
        offs, acc = [0] * (len(n) + 1), 0
        for j in range(len(n), 0, -1):  # coarsest first
            offs[j] = acc
            acc += n[j - 1]
        offs[0] = acc
        return tuple(offs)

    def key_length(self, seq_k: int) -> int:
        return seq_k + sum(self.num_chunks(seq_k))

    def boundaries(self, p, xp=np):
        """[a_0, a_1, ..., a_L] for query positions p (arrays)."""
        pools, spans = self.pools, self.spans_
        a = [(xp.maximum(p - self.window + 1, 0) // pools[0]) * pools[0]]
        for j in range(1, len(pools)):
            a.append((xp.maximum(a[-1] - spans[j - 1], 0) // pools[j]) * pools[j])
        a.append(xp.zeros_like(p))
        return a

    def _terms_for(self, seq_k: int) -> tuple:
        offs = self.level_offsets(seq_k)
        terms = [KeyRange(_Bound(self, offs[0], 0, "lo"), _Bound(self, offs[0], 0, "hi"))]
        for j in range(1, len(self.pools) + 1):
            terms.append(KeyRange(_Bound(self, offs[j], j, "lo"), _Bound(self, offs[j], j, "hi")))
        return tuple(terms)

    def mask(self, p, s, xp=np, *, extent=None, seq_k: int | None = None):
        """Visibility of concatenated-axis key s to query p; `seq_k` is the cache length."""
        if seq_k is None:
            raise ValueError("MultiScale.mask needs seq_k (the cache length) to place its levels")
        vis = None
        for term in self._terms_for(seq_k):
            m = term.mask(p, s, xp, extent)
            vis = m if vis is None else vis | m
        return vis

    def classify(self, g: _Grid, seq_k: int):
        full = touch = None
        for term in self._terms_for(seq_k):
            f, t = term.classify(g)
            full, touch = (f, t) if full is None else (full | f, touch | t)
        return full, touch

    def key_bias(self, seq_k: int) -> np.ndarray:
        """float32 [key_length(seq_k)]: log(P_j) on level j's summaries, 0 on cache keys."""
        n = self.num_chunks(seq_k)
        parts = [np.full(n[j - 1], math.log(self.pools[j - 1]), np.float32) for j in range(len(n), 0, -1)]
        return np.concatenate(parts + [np.zeros(seq_k, np.float32)])

    def density(self, seq_q: int, seq_k: int | None = None, q_offset: int = 0) -> float:
        """Visible pairs over the T x S pairs of dense attention (summaries count as keys)."""
        seq_k = seq_q + q_offset if seq_k is None else seq_k
        t = self.block_tables(seq_q, seq_k, 64, 64, q_offset)
        return t.kept_elements / (seq_q * seq_k)


@dataclasses.dataclass(frozen=True)
class _Bound:
    """lo or hi of level j's visible range on the concatenated axis, as a function of p."""

    pattern: MultiScale
    offset: int
    level: int
    which: str

    def __call__(self, p, xp):
        a = self.pattern.boundaries(p, xp)
        if self.level == 0:
            x = a[0] if self.which == "lo" else p + 1
            return self.offset + x
        pool = self.pattern.pools[self.level - 1]
        x = a[self.level] if self.which == "lo" else a[self.level - 1]
        return self.offset + x // pool


# ----------------------------------------------------------------------------- helpers


def anchors_strided() -> Strided:
    """ANCHORS.md: local 256 + every key whose position mod 1024 < 128, causal."""
    return Strided(window=256, period=1024, width=128)


def describe(pattern: Pattern) -> str:
    """A short label for tables and plots."""
    if isinstance(pattern, PerHead):
        return f"PerHead[{len(pattern.patterns)}]"
    fields = [f"{f.name}={getattr(pattern, f.name)}" for f in dataclasses.fields(pattern)]
    return f"{pattern.name}({', '.join(fields)})"
