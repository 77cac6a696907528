"""Split-K flash-decode attention over a dense, int8 or int4 KV cache (Pallas, Triton).

One query token per sequence attends over its sequence's cache slots (or a few, T <=
MAX_QUERY_ROWS / G, at consecutive positions: a speculative verify or a draft's catch-up
step; they are more rows of the same tiles, each with its own causal limit). K and V are read
in their storage format (`ollm_jax.kv_cache` stores: Dense, Int8, Int4, possibly a
different one for K and for V) and dequantized in registers:

- int8: four values a 32-bit word, one per quarter of head_dim; each word becomes four
  fp16 values, one for each of four dots over a quarter of the channels:
  scores = (sum_c q_c . (bias + k_c) - bias * sum(q)) * scale (K is converted without
  its fp16 bias, which the score removes once); the V scale multiplies the
  probabilities, and quarter c of the output accumulates p . v_c. (Reading words keeps Triton's conversion
  after the shared-memory load at one 32-bit load per four values; int8 bytes were
  gathered one load per value into the dot layout.)
- int4: four nibbles a 16-bit word, one per quarter of head_dim, read as words the same
  way and masked in place into fp16 subnormals (n * 2^-24; nibbles 1 and 3 are 16 x
  their value, the 1/16 going on q for K and on the output for V), one dot per quarter
  and chunk of at most one quantization group; scores = sum_n scale_n * 2^24 * (q_n .
  nibbles_n) + zero_n * sum(q_n), and for V the group scale multiplies the probabilities
  and the zero point adds sum(p * zero_n) per group. A token's N (scale, zero) pairs
  arrive in one [Ts, 2N] load. Transposed (the int4 default), V's words are
  gathered as a [C, Ts] tile, the mma's A operand, so Triton pipelines them through
  shared memory straight into its registers.
- kivi4 keys (`kv_cache.Kivi4`: int4 words as above, a scale and zero point per channel
  for each group of tokens; block_s is the group): a block's per-channel scales fold
  into q, q_e = fp16(q * scale), so the dots take the nibbles as they are and no per-token
  work is left: scores = 2^24 sum_e q_e . nibbles_e + q . zero. The store's most recent
  tokens, [flushed, flushed + group), sit in its dense residual, which one split reads as
  one more block.
- Integers become fp16 in inline PTX (int8 by a magic-number trick, int4 as subnormals),
  so dots against quantized data run in fp16; dense K/V dot in q's dtype. Quantized
  stores are head-major ([B, K, S, ...], `ollm_jax.kv_cache`): a program's rows are one
  contiguous stretch.

Grid (B, K, P): one program per sequence, KV head and split. All G query heads of a KV
head (T G rows for T queries, row r the query r // G) share one read of each K/V tile
(their rows are padded to a dot-friendly Gp >= 16).
A program walks only the key blocks its sequence can see (a loop bound computed from
the query position), so an 8k context in a 128k cache reads 8k slots; the visible
blocks are dealt out evenly to the P splits. `combine_splits` merges the P partial
softmaxes in a second kernel (one program per sequence, KV head, row and chunk of
channels; `combine_splits_reference` is its plain-JAX twin). With `transposed`, a
program computes scores as K . q^T, [Ts, Gp] with Gp >= 8 (the tokens on the mma's M,
the query heads on N), and its accumulators as V^T . p.

Dimensions: B batch, T queries per sequence, S cache slots (slot s holds position s), H
query heads, K KV heads, G = H // K query heads per KV head, Gp T G padded to a power of
two >= 16 (>= 8 transposed), D head_dim, N = D / group int4 quantization groups, P
splits of the visible key range, Ts keys per block (`block_s`), Q = D/4 channels per
quarter (the int8 and int4 words per token), C = min(group, Q) int4 channels per
unpacked chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

import pallas_kernels  # noqa: F401  (filters the Triton deprecation warning)
from ollm_jax import attention, kv_cache
from ollm_jax.kv_cache import Dense, Int4, Int8, Kivi4, Store

NUM_SMS = 132  # H100 and H200: the grid is sized to cover this many SMs several times
PROGRAMS_PER_SM = 4  # target programs in flight per SM when choosing num_splits (bf16, mixed)
# Quantized on both sides: at most this many programs per SM, so the grid stays within
# one wave (H200, 128k, bench/results/2026-11-27-h200-kv_quant-status.md): int8 5 (64-slot
# blocks in 39 KiB of shared memory: 82 splits at batch 1, 10 at batch 8; 11 splits, just
# over a wave, measured 676 against 569 us at batch 8; session 4); int4 4 (4-bit words on
# both sides, int4 or kivi4 keys, at 2 warps and 3 stages: 66 splits at batch 1, 8 at
# batch 8; sessions 8 and 9. Since session 10 the int4-g64 program takes 160 registers
# and 42 KiB of shared memory, so 5 would fit, but 82 and 10 splits measured 57.8 and
# 349.6 us against 55.9 and 337.2 at 66 and 8, `-s10-f-fd_4bit_splits_b*.log`).
PROGRAMS_PER_SM_QUANT = {"int8": 5, "int4": 4}
# 4-bit words on both sides at blocks of <= 64 slots take half the shared memory and fewer
# registers; programs an SM by the K store's kind. int4 (64-slot blocks by default since
# session 10; 119 registers and 22 KiB at 2 warps, 3 stages, offline): 8, int4-g64 at 128k
# took 52.7-53.1 and 334.5-334.8 us busy with 132 and 16 splits at batch 1 and 8, against
# 56.1 and 336.7 for 128-slot blocks at 66 and 8 (`-s10-j-fd_int4_b64.log`,
# `-s10-k-fd_defaults_128k.log`). kivi4-g64 or -g32 keys: 6, kivi4-g64 64.1 and 395.9 us
# with 99 and 12 splits against 79.7 and 512.0 with 132 and 16 (`-s10-k-*`; session 9: 78.6
# and 540.9 us against 88.4 and 642.5 at 4 programs). Session 11, (scale, zero) pairs in one
# array: int4-g64 at batch 1 44.7 us with 132 splits, 44.2 with 99, 53.6 with 165; kivi4-g64
# 53.2 with 99, 54.5 with 132 (`-s11-d-fd_4bit_splits_b1.log`).
PROGRAMS_PER_SM_4BIT_SMALL_BLOCKS = {"int4": 8, "kivi4": 6}
MIN_BLOCKS_PER_SPLIT = 2  # at the longest context, each split walks at least this many blocks
Q_DTYPES = (jnp.bfloat16, jnp.float16)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: empty splits and rows stay NaN-free
MAX_QUERY_ROWS = 32  # T x G at most: the rows of one program's q tile and accumulators
_LOG2E = 1.4426950408889634  # scores are kept in log2 units, so the softmax is exp2
_NUM_ARRAYS = {"dense": 1, "int8": 2, "int4": 2, "kivi4": 4}  # kernel arrays per store (`_store_arrays`)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kind(store: Store) -> str:
    if isinstance(store, Dense):
        return "dense"
    if isinstance(store, Int8):
        return "int8"
    if isinstance(store, Int4):
        return "int4"
    if isinstance(store, Kivi4):
        return "kivi4"
    raise TypeError(f"expected a kv_cache store (Dense, Int8, Int4, Kivi4), got {type(store).__name__}")


def _store_arrays(store: Store) -> tuple[jax.Array, ...]:
    """The arrays a kernel reads: Dense (x,); Int8 (q, scale); Int4 (q, scale_zero as
    [B, K, S, 2N]: a token's (scale, zero) pairs in one row); Kivi4 (q, scale_zero,
    residual, flushed)."""
    if isinstance(store, Kivi4):
        return store.q, store.scale_zero, store.residual, store.flushed.astype(jnp.int32)
    if isinstance(store, Int4):
        return store.q, store.scale_zero.reshape(*store.scale_zero.shape[:3], -1)
    return tuple(jax.tree.leaves(store))


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class Config:
    block_s: int
    num_splits: int
    num_warps: int
    num_stages: int
    scales_ahead: int  # 1: quantized scales load a block ahead (loop-carried); 0: in their block
    transposed: int = 0  # 1: scores as K . q^T, [Ts, Gp] (tokens on the mma's M, query heads on N >= 8)
    masked_words: int = 0  # 1: quantized words load under the visibility mask; 0: unmasked where S % Ts == 0
    combine_kernel: int = 1  # 1: the splits merge in one Pallas kernel (`combine_splits`); 0: in XLA's fusions


def default_num_splits(batch: int, kv_heads: int, max_len: int, block_s: int,
                       programs_per_sm: int | None = None) -> int:
    """Splits so that B * K * P programs cover the 132 SMs about PROGRAMS_PER_SM times
    (given `programs_per_sm`: at most that many times, one wave), but no more than leave
    each split MIN_BLOCKS_PER_SPLIT blocks of a full cache."""
    if programs_per_sm is None:
        want = pl.cdiv(NUM_SMS * PROGRAMS_PER_SM, batch * kv_heads)
    else:
        want = max(1, NUM_SMS * programs_per_sm // (batch * kv_heads))
    most = max(1, max_len // (MIN_BLOCKS_PER_SPLIT * block_s))
    return max(1, min(want, most))


def _four_bit_words(k_kind: str, v_kind: str) -> bool:
    """4-bit words on both sides: int4 or kivi4 keys, int4 values."""
    return k_kind in ("int4", "kivi4") and v_kind == "int4"


def _programs_per_sm(k_kind: str, v_kind: str, block_s: int) -> int | None:
    if _four_bit_words(k_kind, v_kind):
        return PROGRAMS_PER_SM_QUANT["int4"] if block_s >= 128 else PROGRAMS_PER_SM_4BIT_SMALL_BLOCKS[k_kind]
    return PROGRAMS_PER_SM_QUANT.get(k_kind) if k_kind == v_kind else None


def default_config(k_kind: str, v_kind: str, batch: int, kv_heads: int, max_len: int,
                   token_group: int | None = None) -> Config:
    """The defaults. For D = 128 on sm_90 (pip Triton 3.6, offline), block_s 128 with 4
    warps and 2 stages needs <= 168 registers a thread (int4-g32: 255, no spill) and
    <= 72 KiB of shared memory in every format, so 2-3 programs fit on an SM; block_s 256
    spills for int4-g32 and, with 3 stages, exceeds the shared memory for bf16. int8 on
    both sides takes 64-slot blocks, 3 stages and its scales loaded in their own block:
    on an H200 at 128k that measured 79-82 us of GPU time at batch 1 (as with the scales
    a block ahead) and 593 against 634 us at batch 8, where 128-slot blocks took 89-123
    us at batch 1 (bench/results/2026-11-27-h200-kv_quant-status.md, sessions 3 and 4).
    4-bit words on both sides (int4, kivi4 keys) compute scores transposed (K . q^T) with
    scales in their own block (86.5 against 90.9 us at batch 1, 567 against 596 us at
    batch 8; session 5), and run 2 warps a program with 3 stages: transposed, the V dot's
    M is a quarter's 32 channels, two mma tiles, so 4 warps repeat each other's work
    (int4-g64 67.9 and 439.9 us at batch 1 and 8 against 86.4 and 571.8; sessions 8 and 9).
    int4 takes 64-slot blocks on head-major stores (session 10, PROGRAMS_PER_SM_4BIT_SMALL_BLOCKS).
    A Kivi4 K store is read a token group (`token_group`) a block. Splits: PROGRAMS_PER_SM,
    PROGRAMS_PER_SM_QUANT."""
    int8 = k_kind == v_kind == "int8"
    int4 = _four_bit_words(k_kind, v_kind)
    block_s = token_group if k_kind == "kivi4" else min(64 if int8 or int4 else 128, max(16, _pow2_ceil(max_len)))
    return Config(
        block_s=block_s,
        num_splits=default_num_splits(batch, kv_heads, max_len, block_s, _programs_per_sm(k_kind, v_kind, block_s)),
        num_warps=2 if int4 else 4,
        num_stages=3 if int8 or int4 else 2,
        scales_ahead=0 if int8 or int4 else 1,
        transposed=1 if int4 else 0,
        masked_words=0,
        combine_kernel=1,
    )


def resolve_config(
    k_kind: str, v_kind: str, batch: int, kv_heads: int, max_len: int,
    block_s: int | None = None, num_splits: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, scales_ahead: int | None = None,
    transposed: int | None = None, masked_words: int | None = None, combine_kernel: int | None = None,
    token_group: int | None = None,
) -> Config:
    """The knobs given, the defaults for the rest (num_splits follows the block size).
    `token_group`: a Kivi4 K store's group, its block size."""
    cfg = default_config(k_kind, v_kind, batch, kv_heads, max_len, token_group)
    if k_kind == "kivi4" and block_s not in (None, token_group):
        raise ValueError(f"{block_s=}: a Kivi4 K store is read a token group at a time, block_s = {token_group}")
    block_s = block_s or cfg.block_s
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"{block_s=} must be a power of two >= 16")
    return Config(
        block_s=block_s,
        num_splits=num_splits or default_num_splits(batch, kv_heads, max_len, block_s,
                                                    _programs_per_sm(k_kind, v_kind, block_s)),
        num_warps=num_warps or cfg.num_warps,
        num_stages=num_stages or cfg.num_stages,
        scales_ahead=cfg.scales_ahead if scales_ahead is None else int(bool(scales_ahead)),
        transposed=cfg.transposed if transposed is None else int(bool(transposed)),
        masked_words=cfg.masked_words if masked_words is None else int(bool(masked_words)),
        combine_kernel=cfg.combine_kernel if combine_kernel is None else int(bool(combine_kernel)),
    )


# ------------------------------------------------------------------------------ kernel


# Integer -> fp16 conversions by the fp16 "magic number" trick: a byte u placed under the
# high byte 0x64 reads as the fp16 1024 + u (exact: fp16 steps by 1 in [1024, 2048)), and
# one packed fp16x2 subtraction removes the bias. Quantized data therefore meets q and
# the probabilities in fp16 dots: fp16 holds a bf16 query entry exactly when
# 2^-14 <= |q| < 65504 (smaller ones keep an absolute error below 2^-25), and rounds
# probabilities 8x finer than bf16. Each asm takes two words (pack=2: two tokens' words,
# the pair mma wants in one register) and returns one quarter's two values as an fp16x2;
# one asm per quarter, as jax 0.11.2's Pallas lowers single-result asm only. Interpret
# mode runs the jnp equivalents (the same values); tests/test_flash_decode.py runs these
# strings through a small PTX emulator on every value in every position.
#
# int8 words (kv_cache.Int8, uint32): the prmt gathers byte c of the two words into
# bytes 0 and 2, one lop3 masks them and xors in both the 0x64 high bytes and the sign
# flip (byte ^ 0x80 = b + 128), and the subtraction removes 1024 + 128: 1.5
# instructions a value. The biased variant stops before the subtraction (fp16
# INT8_BIAS + b, exact, 1 instruction a value): K's dot removes the bias once per score,
# q . (bias + k) - bias * sum(q), with sum(q) computed once per program.
INT8_BIAS = 1024 + 128
_PTX_INT8_WORDS_TO_FP16 = """{{
.reg .b32 t, mask, magic;
mov.b32 mask, 0x00FF00FF;
mov.b32 magic, 0x64806480;
prmt.b32 t, $1, $2, {selector};
{last}
}}"""
_INT8_SELECTORS = tuple(hex(c | c << 4 | (4 + c) << 8 | (4 + c) << 12) for c in range(4))
PTX_INT8_WORDS_TO_FP16 = tuple(_PTX_INT8_WORDS_TO_FP16.format(
    selector=sel, last="lop3.b32 t, t, mask, magic, 0x6A;\nsub.f16x2 $0, t, magic;") for sel in _INT8_SELECTORS)
PTX_INT8_WORDS_TO_BIASED_FP16 = tuple(_PTX_INT8_WORDS_TO_FP16.format(
    selector=sel, last="lop3.b32 $0, t, mask, magic, 0x6A;") for sel in _INT8_SELECTORS)
# int4 words (kv_cache.Int4, uint16; two arrive packed in one 32-bit register) become fp16
# subnormals: fp16 bits m < 1024 read as m * 2^-24, exactly, so masking nibble e in place
# is the whole conversion, one `and` for two values: n * 2^-24 for even e, 16 n * 2^-24
# for odd e. Nibbles 2 and 3 first move down a byte (one prmt a register, shared by both):
# 0.625 instructions a value, with no bias to remove. The dots take the subnormals as
# they are (tensor cores keep fp16 subnormal operands; the GPU tests compare with the
# oracle) and INT4_UNIT scales their f32 results back once.
INT4_UNIT = 2.0**-24  # the value of fp16 bits 1: a converted nibble n is n * INT4_UNIT
PTX_INT4_HIGH_BYTES = "prmt.b32 $0, $1, $1, 0x3311;"  # each 16-bit word's high byte, in both its bytes
PTX_INT4_NIBBLES_TO_FP16 = ("and.b32 $0, $1, 0x000F000F;", "and.b32 $0, $1, 0x00F000F0;")  # even, odd e


def _words_to_fp16(words: jax.Array, ptx: tuple[str, ...], constraints: str) -> list[jax.Array]:
    return [plt.elementwise_inline_asm(asm, args=[words], constraints=constraints, pack=2,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float16)])[0]
            for asm in ptx]


def int8_words_to_fp16(words: jax.Array, interpret: bool, biased: bool = False) -> list[jax.Array]:
    """uint32 words [Ts, Q] -> the four quarters' values, fp16 [Ts, Q] each, exact (plus
    INT8_BIAS when `biased`)."""
    if interpret:
        bias = INT8_BIAS if biased else 0
        return [(lax.bitcast_convert_type(((words >> (8 * c)) & 0xFF).astype(jnp.uint8), jnp.int8).astype(jnp.int32)
                 + bias).astype(jnp.float16) for c in range(4)]
    return _words_to_fp16(words, PTX_INT8_WORDS_TO_BIASED_FP16 if biased else PTX_INT8_WORDS_TO_FP16, "=r,r,r")


def _int4_words_to_fp16(words: jax.Array, interpret: bool) -> list[jax.Array]:
    """uint16 words (any shape) -> the four quarters' nibbles, fp16 each, exact, in units
    of INT4_UNIT: n for quarters 0 and 2, 16 n for quarters 1 and 3 (masked in place)."""
    if interpret:
        high = (words >> 8) * 0x0101  # as PTX_INT4_HIGH_BYTES: the high byte in both bytes
        return [lax.bitcast_convert_type(src & (0xF0 if e % 2 else 0x0F), jnp.float16)
                for e, src in enumerate((words, words, high, high))]
    # int16: Triton's asm results are signless integers.
    high = plt.elementwise_inline_asm(PTX_INT4_HIGH_BYTES, args=[words], constraints="=r,r", pack=2,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int16)])[0]
    return [_words_to_fp16(src, (PTX_INT4_NIBBLES_TO_FP16[e % 2],), "=r,r")[0]
            for e, src in enumerate((words, words, high, high))]


def _flash_decode_kernel(
    pos_ref,  # [B, T] int32, whole: the queries' positions (row b's first: -1 for a padding row)
    q_ref,  # [Gp, D] rows >= T G are outside q (masked)
    *refs,  # K store refs, V store refs (each [S, ...]; a Kivi4 K store's `flushed` [B] whole),
    #         then o_ref [Gp, D] f32, m_ref [Gp], l_ref [Gp]
    k_kind: str,
    v_kind: str,
    num_heads_per_kv: int,  # G
    num_queries: int,  # T
    max_len: int,  # S
    block_s: int,  # Ts
    num_splits: int,  # P
    sliding_window: int | None,
    sm_scale: float,
    scales_ahead: bool,
    transposed: bool,
    masked_words: bool,
    interpret: bool,
):
    n_k, n_v = _NUM_ARRAYS[k_kind], _NUM_ARRAYS[v_kind]
    k_refs, v_refs = refs[:n_k], refs[n_k : n_k + n_v]
    o_ref, m_ref, l_ref = refs[n_k + n_v :]
    seq, split = pl.program_id(0), pl.program_id(2)  # read at the top level (interpret mode needs it here)
    gp, d = q_ref.shape
    quarter = d // 4  # Q
    dt = q_ref.dtype  # dense K/V tiles are cast to q's dtype (bf16/fp16) for their dots
    qdt = jnp.float16  # dots against quantized K or V (see the PTX conversions above)
    f32 = jnp.float32
    score_scale = sm_scale * _LOG2E  # scores in log2 units: the softmax uses exp2

    # Orientation: score tiles are [Gp, Ts] (query heads on the mma's M) or, transposed,
    # [Ts, Gp] (tokens on M, heads on N >= 8: half the padded f32 work for GQA 4);
    # accumulators [Gp, W] or [W, Gp].
    tok_axis = 0 if transposed else 1

    def by_head(x):  # [Gp] -> broadcast along a score or accumulator tile
        return x[None, :] if transposed else x[:, None]

    def by_token(x):  # [Ts] -> broadcast along a score tile
        return x[:, None] if transposed else x[None, :]

    def qk(q_part, k_part):  # q [Gp, W], K [Ts, W] -> f32 scores in orientation
        if transposed:
            return jnp.dot(k_part, q_part.T, preferred_element_type=f32)  # [Ts, Gp]
        return jnp.dot(q_part, k_part.T, preferred_element_type=f32)  # [Gp, Ts]

    def pv(p, v_part):  # probabilities in orientation, V [Ts, W] -> f32 [Gp, W] or [W, Gp]
        if transposed:
            return jnp.dot(v_part.T, p, preferred_element_type=f32)
        return jnp.dot(p, v_part, preferred_element_type=f32)

    def acc_zeros(width):
        return jnp.zeros((width, gp) if transposed else (gp, width), f32)

    # Rows >= T G of the q block lie outside q: masked to zero on load and on store.
    rows_used = num_queries * num_heads_per_kv
    row_mask = None if gp == rows_used else (jnp.arange(gp) < rows_used)[:, None]  # [Gp, 1]

    def load_q(cols):
        return plt.load(q_ref.at[:, cols], mask=row_mask, other=0) if row_mask is not None else q_ref[:, cols]

    # The visible slots [lo, hi) (of any query) and the blocks this split walks. A Kivi4 K
    # store (block_s = its token group) holds the slots [flushed, flushed + Ts) in its dense
    # residual: one more block, dealt out after the quantized ones.
    pos = pos_ref[seq, 0]
    flushed = k_refs[3][seq] if k_kind == "kivi4" else max_len  # slots below it are quantized
    hi = jnp.where(pos < 0, 0, jnp.minimum(pos + num_queries, max_len))  # pos = -1 (padding) -> no block
    lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos + 1 - sliding_window, 0)
    first_block = lax.div(lo, block_s)
    quantized_hi = jnp.minimum(hi, flushed) if k_kind == "kivi4" else hi
    n_blocks = jnp.maximum(lax.div(quantized_hi + block_s - 1, block_s) - first_block, 0)
    has_residual = (hi > jnp.maximum(lo, flushed)).astype(jnp.int32) if k_kind == "kivi4" else 0
    per_split = jnp.maximum(lax.div(n_blocks + has_residual + num_splits - 1, num_splits), 1)
    start_block = first_block + split * per_split
    count = jnp.clip(n_blocks - split * per_split, 0, per_split)
    residual_count = jnp.where(lax.div(n_blocks, per_split) == split, has_residual, 0)  # 0 or 1

    def block_rows(t0):
        slots = t0 + jnp.arange(block_s)  # [Ts]
        return pl.ds(t0, block_s), (slots >= lo) & (slots < hi)  # rows, visible [Ts]

    # Several queries: row r is the query at pos + r // G, with its own causal (and window) limit.
    q_pos = by_head(pos + jnp.arange(gp) // num_heads_per_kv) if num_queries > 1 else None  # [1, Gp] or [Gp, 1]

    # Quantized words load unmasked (unless `masked_words`) when every block lies inside the
    # cache (S a multiple of Ts): a slot outside [lo, hi) then holds some integers, finite
    # whatever their bits, and its scales (and zero points) load masked to 0, so its score
    # is masked and its V term is 0 * finite. Dense K/V (whose stale slots may hold NaN) and
    # the scales stay masked.
    def load_words(ref, vis2):  # ref a [Ts, W] view of a word array
        if masked_words or max_len % block_s:
            return plt.load(ref, mask=vis2, other=0)
        return plt.load(ref)

    def int4_layout(refs_):  # (group, chunk C, chunks per quarter, N)
        group = 8 * refs_[0].shape[-1] // refs_[1].shape[-1]  # words [S, D/4], (scale, zero) pairs [S, 2N]
        chunk = min(group, quarter)
        return group, chunk, quarter // chunk, d // group

    def int4_parts(chunks: int, chunk: int):  # (quarter e, chunk c, first channel) of every dot
        return [(e, c, e * quarter + c * chunk) for c in range(chunks) for e in range(4)]

    # ---- Per-token scales (and int4 zero points), f32 [Ts] each: with `scales_ahead`,
    # loaded one block ahead (carried through the loop) so their latency hides behind the
    # current block; otherwise in their block, left to Triton's pipelining.
    def load_scales(t0):
        rows, visible = block_rows(t0)

        def vec(ref, *col):  # [Ts] f32
            return plt.load(ref.at[(rows, *col)], mask=visible, other=0).astype(f32)

        def split_cols(x):  # [Ts, n] -> n x [Ts], n a power of two (tt.split halves)
            if x.shape[1] == 1:
                return [x.reshape(block_s)]
            even, odd = jnp.unstack(x.reshape(block_s, x.shape[1] // 2, 2), axis=-1)  # [Ts, n/2] each
            return [c for pair in zip(split_cols(even), split_cols(odd)) for c in pair]

        def cols(ref):  # per-group [Ts, n] -> n x [Ts] f32: a token's n groups in one (vector) load
            if ref.shape[-1] == 1:
                return [vec(ref, jnp.int32(0))]
            return split_cols(plt.load(ref.at[rows, :], mask=visible[:, None], other=0).astype(f32))

        k_sc, v_sc = (), ()
        if k_kind == "int8":
            k_sc = (vec(k_refs[1]) * score_scale,)
        elif k_kind == "int4":  # scale_0, zero_0, scale_1, ...
            k_sc = tuple(x * (score_scale / INT4_UNIT) if i % 2 == 0 else x for i, x in enumerate(cols(k_refs[1])))
        if v_kind == "int8":
            v_sc = (vec(v_refs[1]),)
        elif v_kind == "int4":
            v_sc = tuple(cols(v_refs[1]))  # scale_0, zero_0, scale_1, ...
        return k_sc, v_sc

    # ---- K side: scores f32 in orientation, in log2 units.
    if k_kind == "int4":
        k_group, k_chunk, k_chunks, k_n = int4_layout(k_refs)
        # Word column c*C.. of quarter e holds channels e*Q + c*C..; channel col is in group col // group.
        q_parts = {(e, c): load_q(pl.ds(col, k_chunk)).astype(qdt) for e, c, col in int4_parts(k_chunks, k_chunk)}
        # Per group n: q_sum[n] = sum(q), for the zero points, in score units. Quarters 1 and 3
        # arrive as 16 x their nibbles, so their q parts carry the 1/16 (exact in fp16 for
        # |q| >= 2^-10) and a group's dots add up.
        q_sum = [jnp.zeros((gp,), f32) for _ in range(k_n)]
        for e, c, col in int4_parts(k_chunks, k_chunk):
            q_sum[col // k_group] += jnp.sum(q_parts[e, c].astype(f32), axis=1)
            if e % 2:
                q_parts[e, c] = q_parts[e, c] * jnp.asarray(0.0625, qdt)
        q_sum = [x * score_scale for x in q_sum]  # [Gp] each
    elif k_kind == "kivi4":
        # Per-channel scales, one row per block (its token group): each block folds them into q
        # (K = n * scale + zero, so q . K = (q * scale) . n + q . zero), rounded once to fp16.
        q_scored = [load_q(pl.ds(e * quarter, quarter)).astype(f32) * score_scale for e in range(4)]  # [Gp, Q]
    elif k_kind == "int8":
        q_quarters = [load_q(pl.ds(c * quarter, quarter)).astype(qdt) for c in range(4)]  # [Gp, Q] each
        q_bias = INT8_BIAS * sum(jnp.sum(x.astype(f32), axis=1) for x in q_quarters)  # [Gp]: bias * sum(q)
    else:
        q = load_q(slice(None)).astype(dt)  # [Gp, D]

    def k_scores(t0, rows, visible, k_sc):
        vis2 = visible[:, None]  # [Ts, 1]
        if k_kind == "kivi4":
            group = lax.div(t0, block_s)  # this block's row of per-channel scales
            words = load_words(k_refs[0].at[rows, :], vis2)  # [Ts, Q] u16
            s, offset = None, None
            for e, n_e in enumerate(_int4_words_to_fp16(words, interpret)):  # [Ts, Q]: n (16 n), in INT4_UNITs
                cols = pl.ds(e * quarter, quarter)
                scale, zero = (plt.load(k_refs[1].at[group, jnp.int32(i), cols]).astype(f32) for i in (0, 1))  # [Q]
                scale = scale * (0.0625 if e % 2 else 1.0)
                q_e = (q_scored[e] * scale[None, :]).astype(qdt)  # [Gp, Q]
                part = qk(q_e, n_e)
                # The zero points' term, channel by channel; one sum over the channels after the quarters.
                off = q_scored[e] * zero[None, :]  # [Gp, Q]
                s = part if s is None else s + part
                offset = off if offset is None else offset + off
            return s * (1 / INT4_UNIT) + by_head(jnp.sum(offset, axis=1))
        if k_kind == "dense":
            k = plt.load(k_refs[0].at[rows, :], mask=vis2, other=0).astype(dt)  # [Ts, D]
            return qk(q, k) * score_scale
        if k_kind == "int8":
            words = load_words(k_refs[0].at[rows, :], vis2)  # [Ts, Q] u32
            k = int8_words_to_fp16(words, interpret, biased=True)  # [Ts, Q] x 4: bias + k
            dots = [qk(q_c, k_c) for q_c, k_c in zip(q_quarters, k)]
            return (dots[0] + dots[1] + dots[2] + dots[3] - by_head(q_bias)) * by_token(k_sc[0])
        # Per group: q . nibbles over its quarters and chunks, f32 in units of INT4_UNIT.
        dots = [None] * k_n
        for c in range(k_chunks):
            words = load_words(k_refs[0].at[rows, pl.ds(c * k_chunk, k_chunk)], vis2)  # [Ts, C] u16
            for e, n_e in enumerate(_int4_words_to_fp16(words, interpret)):  # [Ts, C]
                n = (e * quarter + c * k_chunk) // k_group
                part = qk(q_parts[e, c], n_e)
                dots[n] = part if dots[n] is None else dots[n] + part
        s = None
        for n in range(k_n):
            scale, zero = k_sc[2 * n], k_sc[2 * n + 1]  # [Ts]
            term = dots[n] * by_token(scale) + by_head(q_sum[n]) * by_token(zero)
            s = term if s is None else s + term
        return s

    # ---- V side: unnormalized f32 accumulators and their update.
    if v_kind == "int4":
        v_group, v_chunk, v_chunks, v_n = int4_layout(v_refs)
        # [Gp, C] per (quarter, chunk) (int4_parts order), then sum(p * zero_n) [Gp] per group.
        acc0 = tuple(acc_zeros(v_chunk) for _ in range(4 * v_chunks)) + tuple(
            jnp.zeros((gp,), f32) for _ in range(v_n)
        )
    elif v_kind == "int8":
        acc0 = tuple(acc_zeros(quarter) for _ in range(4))  # [Gp, Q] per quarter
    else:
        acc0 = (acc_zeros(d),)  # [Gp, D]

    def v_accumulate(rows, visible, p, acc, v_sc):
        vis2 = visible[:, None]  # [Ts, 1]
        if v_kind == "dense":
            v = plt.load(v_refs[0].at[rows, :], mask=vis2, other=0).astype(dt)  # [Ts, D]
            return (acc[0] + pv(p.astype(dt), v),)
        if v_kind == "int8":
            # Unbiased: removing V's bias after the loop needs sum(p_scaled) a block, which
            # costs what it saves (offline SASS).
            v = int8_words_to_fp16(load_words(v_refs[0].at[rows, :], vis2), interpret)  # [Ts, Q] x 4
            p_scaled = (p * by_token(v_sc[0])).astype(qdt)  # the V scale on the probabilities
            return tuple(a + pv(p_scaled, v_c) for a, v_c in zip(acc, v))
        p_scaled, z_acc = [], list(acc[4 * v_chunks :])
        for n in range(v_n):
            scale, zero = v_sc[2 * n], v_sc[2 * n + 1]  # [Ts]
            p_scaled.append((p * by_token(scale)).astype(qdt))
            z_acc[n] = z_acc[n] + jnp.sum(p * by_token(zero), axis=tok_axis)  # [Gp]
        def words_as_dotted(c):  # chunk c's words as the V dot takes them: V^T [C, Ts] transposed, else V [Ts, C]
            if not transposed:
                return load_words(v_refs[0].at[rows, pl.ds(c * v_chunk, v_chunk)], vis2)
            # Gathered transposed (an index array per axis): a trans of the loaded tile stops
            # Triton's pipelining of the words into the mma operand.
            slots = (rows.start + jnp.arange(block_s))[None, :]  # [1, Ts]
            chans = (c * v_chunk + jnp.arange(v_chunk))[:, None]  # [C, 1]
            return load_words(v_refs[0].at[slots, chans], visible[None, :])

        out = list(acc[: 4 * v_chunks])
        for c in range(v_chunks):
            for e, n_e in enumerate(_int4_words_to_fp16(words_as_dotted(c), interpret)):  # 16 x for odd e, INT4_UNITs
                i = 4 * c + e  # int4_parts order; the units (and 1/16 of odd quarters) are applied after the loop
                p_e = p_scaled[(e * quarter + c * v_chunk) // v_group]
                out[i] += jnp.dot(n_e, p_e, preferred_element_type=f32) if transposed else pv(p_e, n_e)
        return tuple(out) + tuple(z_acc)

    def residual_scores(t0, rows, visible, k_sc):  # a Kivi4 store's residual: slot r holds position t0 + r
        k = plt.load(k_refs[2].at[:, :], mask=visible[:, None], other=0).astype(dt)  # [Ts, D]
        return qk(load_q(slice(None)).astype(dt), k) * score_scale

    def attend_block(t0, m_prev, l_prev, acc, k_sc, v_sc, scores_fn):
        rows, visible = block_rows(t0)  # every walked block has a visible slot
        mask = by_token(visible)
        if q_pos is not None:
            slots = by_token(t0 + jnp.arange(block_s))
            mask = mask & (slots <= q_pos)
            if sliding_window is not None:
                mask = mask & (slots > q_pos - sliding_window)
        s = jnp.where(mask, scores_fn(t0, rows, visible, k_sc), _MASKED)  # [Gp, Ts] or [Ts, Gp]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=tok_axis))  # [Gp]
        correction = jnp.exp2(m_prev - m_next)  # [Gp]
        p = jnp.exp2(s - by_head(m_next))  # f32, as s
        l_next = l_prev * correction + jnp.sum(p, axis=tok_axis)
        acc = tuple(a * (by_head(correction) if a.ndim == 2 else correction) for a in acc)
        return m_next, l_next, v_accumulate(rows, visible, p, acc, v_sc)

    def body(i, carry):
        m_prev, l_prev, acc, scales = carry  # [Gp], [Gp], accumulators, this block's scales (or ())
        t0 = (start_block + i) * block_s
        if scales_ahead:
            k_sc, v_sc = scales
            next_scales = load_scales(t0 + block_s)  # masked past the visible range: no read there
        else:
            (k_sc, v_sc), next_scales = load_scales(t0), ()
        return (*attend_block(t0, m_prev, l_prev, acc, k_sc, v_sc, k_scores), next_scales)

    def residual_body(_, carry):  # the Kivi4 residual block, [flushed, flushed + Ts)
        return attend_block(flushed, *carry, *load_scales(flushed), residual_scores)

    m0 = jnp.full((gp,), _MASKED, f32)
    l0 = jnp.zeros((gp,), f32)
    scales0 = load_scales(start_block * block_s) if scales_ahead else ()
    m, l, acc, _ = lax.fori_loop(0, count, body, (m0, l0, acc0, scales0))
    if k_kind == "kivi4":
        m, l, acc = lax.fori_loop(0, residual_count, residual_body, (m, l, acc))

    def store(cols, x):  # an accumulator (in orientation) -> o_ref[:, cols], [Gp, width]
        x = x.T if transposed else x
        if row_mask is None:
            o_ref[:, cols] = x
        else:
            plt.store(o_ref.at[:, cols], x, mask=row_mask)

    if v_kind == "int4":
        for i, (e, _, col) in enumerate(int4_parts(v_chunks, v_chunk)):
            a = acc[i] * ((0.0625 if e % 2 else 1.0) / INT4_UNIT)
            z = acc[4 * v_chunks + col // v_group]  # [Gp]: sum(p * zero) of this chunk's group
            store(pl.ds(col, v_chunk), a + by_head(z))  # [Gp, C]
    elif v_kind == "int8":
        for c in range(4):
            store(pl.ds(c * quarter, quarter), acc[c])  # [Gp, Q]
    else:
        store(slice(None), acc[0])  # [Gp, D]
    vec_mask = None if row_mask is None else row_mask[:, 0]
    plt.store(m_ref, m, mask=vec_mask)
    plt.store(l_ref, l, mask=vec_mask)


# ----------------------------------------------------------------------------- wrapper


def combine_splits_reference(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges P partial softmaxes (plain-JAX twin of `combine_splits`). o [B, K, P, R, D]
    unnormalized, m and l [B, K, P, R] (running max of the scores in log2 units, and sum of
    exp2(score - m)); returns [B, K, R, D] f32. A row no split saw (padding) gets 0, not NaN."""
    m_max = jnp.max(m, axis=2, keepdims=True)  # [B, K, 1, R]
    # jax's own decode kernel needs this barrier to avoid NaNs after fusion (b/389925439).
    m_max = lax.optimization_barrier(m_max)
    w = jnp.exp2(m - m_max)  # [B, K, P, R]
    l_sum = jnp.sum(w * l, axis=2)  # [B, K, R]
    o_sum = jnp.sum(w[..., None] * o, axis=2)  # [B, K, R, D]
    return o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]


COMBINE_TILE = 4096  # f32 elements of o one combine program reads: [P padded to a power of two, Dc]


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, num_splits: int):
    # o_ref [P, Dc], m_ref and l_ref [P]: one row's splits; out_ref [Dc].
    pp = _pow2_ceil(num_splits)
    valid = jnp.arange(pp) < num_splits  # [Pp]: loads are powers of two, P need not be
    m = plt.load(m_ref.at[pl.ds(0, pp)], mask=valid, other=_MASKED)
    l = plt.load(l_ref.at[pl.ds(0, pp)], mask=valid, other=0)
    w = jnp.where(valid, jnp.exp2(m - jnp.max(m)), 0)  # [Pp]
    l_sum = jnp.sum(w * l)
    o = plt.load(o_ref.at[pl.ds(0, pp), :], mask=valid[:, None], other=0)  # [Pp, Dc]
    out_ref[...] = (jnp.sum(w[:, None] * o, axis=0) / jnp.where(l_sum > 0, l_sum, 1.0)).astype(out_ref.dtype)


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array, out_dtype, interpret: bool = False) -> jax.Array:
    """Merges P partial softmaxes in one kernel (the split-K decode's second step): o
    [B, K, P, R, D] unnormalized, m and l [B, K, P, R] as `combine_splits_reference` takes
    them; returns [B, K, R, D] in `out_dtype`. One program per (sequence, KV head, row,
    chunk of Dc channels) reads that row's P partials, so the merge is one launch where XLA
    makes three to five small ones."""
    b, kv_heads, p, r, d = o.shape
    dc = max(1, min(d, COMBINE_TILE // _pow2_ceil(p)))
    return pl.pallas_call(
        functools.partial(_combine_kernel, num_splits=p),
        grid=(b, kv_heads, r, d // dc),
        in_specs=[
            pl.BlockSpec((None, None, p, None, dc), lambda bi, ki, ri, ci: (bi, ki, 0, ri, ci)),
            pl.BlockSpec((None, None, p, None), lambda bi, ki, ri, ci: (bi, ki, 0, ri)),
            pl.BlockSpec((None, None, p, None), lambda bi, ki, ri, ci: (bi, ki, 0, ri)),
        ],
        out_specs=pl.BlockSpec((None, None, None, dc), lambda bi, ki, ri, ci: (bi, ki, ri, ci)),
        out_shape=jax.ShapeDtypeStruct((b, kv_heads, r, d), out_dtype),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="flash_decode_combine",
    )(o, m, l)


def _check(q, k: Store, v: Store, q_positions, sliding_window) -> tuple[str, str]:
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, H, D] or [B, T, H, D], got {q.shape=}")
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be bfloat16 or float16, got {q.dtype=}")
    k_kind, v_kind = _kind(k), _kind(v)
    b, *t, h, d = q.shape
    shapes = {}
    for name, store, kind in (("k", k, k_kind), ("v", v, v_kind)):
        data = _store_arrays(store)[0]
        if data.ndim != 4:
            raise ValueError(f"{name} store data must be [B, S, K, D] (dense) or [B, K, S, D/4], got {data.shape=}")
        shapes[name] = kv_cache.dims(store)  # (B, S, K, D)
        width = shapes[name][3]
        if kind == "dense" and data.dtype not in Q_DTYPES:
            raise ValueError(f"dense {name} must be bfloat16 or float16, got {data.dtype=}")
        if kind == "int8" and width < 64:
            raise ValueError(f"{name}: int8 needs head_dim >= 64 (quarters of >= 16 channels), got {width}")
        if kind == "kivi4" and (name == "v" or width < 64 or shapes[name][1] % store.group):
            raise ValueError(f"{name}: a Kivi4 store (per-channel int4) is read as K with head_dim >= 64 and whole "
                             f"token groups, got it as {name} with head_dim {width}, {shapes[name][1]} slots, "
                             f"group {store.group}")
        if kind == "int4":
            n, group = store.scale_zero.shape[-2], store.group
            quarter = width // 4
            if n * group != width or not (quarter % group == 0 or group % quarter == 0) or min(group, quarter) < 16:
                raise ValueError(f"{name}: int4 group {group} ({n} groups) unsupported for head_dim {width}")
    if shapes["k"] != shapes["v"]:
        raise ValueError(f"k and v stores hold different shapes: {shapes['k']=} vs {shapes['v']=}")
    kb, s, kh, kd = shapes["k"]
    if kb != b or kd != d:
        raise ValueError(f"q {q.shape=} does not match the cache [B, S, K, D] = {shapes['k']}")
    if h % kh:
        raise ValueError(f"query heads {h} not a multiple of KV heads {kh}")
    if t and t[0] * (h // kh) > MAX_QUERY_ROWS:
        raise ValueError(f"{t[0]} queries x {h // kh} heads per KV head: more than MAX_QUERY_ROWS = {MAX_QUERY_ROWS}")
    if d & (d - 1) or not 32 <= d <= 256:
        raise ValueError(f"head_dim {d} unsupported: a power of two in [32, 256]")
    if q_positions.shape != (b, *t):
        raise ValueError(f"q_positions must be [B] or [B, T] as q, {(b, *t)}, got {q_positions.shape=}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be >= 1 or None")
    return k_kind, v_kind


def supports(q: jax.Array, k: Store, v: Store) -> bool:
    """Whether `flash_decode` takes these inputs (a dispatch point's test before calling
    it): bf16/fp16 q [B, H, D] or [B, T, H, D] with T G <= MAX_QUERY_ROWS; Dense
    bf16/fp16, Int8 or Int4 stores, or a Kivi4 K store (not fp32); head_dim a power of two
    in [32, 256]; matching shapes."""
    try:
        _check(q, k, v, jnp.zeros(q.shape[:-2], jnp.int32), None)
    except (TypeError, ValueError):
        return False
    return True


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "block_s", "num_splits", "num_warps", "num_stages", "scales_ahead", "transposed",
                     "masked_words", "combine_kernel", "interpret"),
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
    scales_ahead: int | None = None,
    transposed: int | None = None,
    masked_words: int | None = None,
    combine_kernel: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of one query token per sequence (or T at consecutive positions) over its
    KV cache.

    Args:
      q: [B, H, D] or [B, T, H, D] (T G <= MAX_QUERY_ROWS) bf16/fp16, RoPE applied.
      k, v: kv_cache stores (Dense bf16/fp16 [B, S, K, D]; Int8, Int4, K also Kivi4, head-major
        words [B, K, S, D/4]); slot s holds position s. K and V may be in different formats.
      q_positions: [B] (or [B, T]: consecutive, trailing -1s allowed) int32; the query at
        p sees slots s <= p (and s > p - sliding_window); -1 marks a padding row or
        query (finite output, value unused).
      sliding_window: None (all) or the window length.
      block_s, num_splits, num_warps, num_stages, scales_ahead, transposed, masked_words, combine_kernel: knobs
        (`Config`); None picks `default_config` (num_splits from B, K and S to fill 132 SMs).
        A Kivi4 K store's blocks are its token groups: block_s is its group.
      interpret: run the kernel in Pallas interpret mode (CPU tests).
    Returns:
      [B, H, D] or [B, T, H, D] (as q) in q's dtype.
    """
    k_kind, v_kind = _check(q, k, v, q_positions, sliding_window)
    b, *lead, h, d = q.shape
    t = lead[0] if lead else 1
    _, s, kv_heads, _ = kv_cache.dims(k)
    g = h // kv_heads
    cfg = resolve_config(k_kind, v_kind, b, kv_heads, s, block_s, num_splits, num_warps, num_stages, scales_ahead,
                         transposed, masked_words, combine_kernel, token_group=k.group if k_kind == "kivi4" else None)
    gp = max(8 if cfg.transposed else 16, _pow2_ceil(t * g))  # the mma's N (transposed) or M: >= 8 or 16

    def cache_specs(store):
        # The whole cache row of one (sequence, KV head); the kernel slices its blocks.
        if isinstance(store, Dense):  # token-major [B, S, K, D]
            return [pl.BlockSpec((None, s, None, d), lambda bi, ki, pi: (bi, 0, ki, 0))]
        # Head-major: int8 scale [B, K, S]; [B, K, S, D/4 or 2N]; Kivi4 scale_zero [B, K, S/group, 2, D]
        # and residual [B, K, group, D]; Kivi4 flushed [B], whole.
        def head_row(x):
            if x.ndim == 1:
                return pl.BlockSpec((b,), lambda bi, ki, pi: (0,))
            return pl.BlockSpec((None, None, *x.shape[2:]), lambda bi, ki, pi: (bi, ki) + (0,) * (x.ndim - 2))

        return [head_row(x) for x in _store_arrays(store)]

    k_arrays, v_arrays = _store_arrays(k), _store_arrays(v)
    kernel = functools.partial(
        _flash_decode_kernel,
        k_kind=k_kind,
        v_kind=v_kind,
        num_heads_per_kv=g,
        num_queries=t,
        max_len=s,
        block_s=cfg.block_s,
        num_splits=cfg.num_splits,
        sliding_window=sliding_window,
        sm_scale=d**-0.5,
        scales_ahead=bool(cfg.scales_ahead),
        transposed=bool(cfg.transposed),
        masked_words=bool(cfg.masked_words),
        interpret=interpret,
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, cfg.num_splits),
        in_specs=[
            pl.BlockSpec((b, t), lambda bi, ki, pi: (0, 0)),
            pl.BlockSpec((None, None, gp, d), lambda bi, ki, pi: (bi, ki, 0, 0)),
            *cache_specs(k),
            *cache_specs(v),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda bi, ki, pi: (bi, ki, pi, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, pi: (bi, ki, pi, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, pi: (bi, ki, pi, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, cfg.num_splits, t * g, d), jnp.float32),  # o, unnormalized
            jax.ShapeDtypeStruct((b, kv_heads, cfg.num_splits, t * g), jnp.float32),  # m
            jax.ShapeDtypeStruct((b, kv_heads, cfg.num_splits, t * g), jnp.float32),  # l
        ],
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"flash_decode_k{k_kind}_v{v_kind}",
    )(q_positions.reshape(b, t).astype(jnp.int32),  # [B, T]: taken whole, so no XLA op builds it
      q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d), *k_arrays, *v_arrays)
    if cfg.combine_kernel:
        out = combine_splits(o, m, l, q.dtype, interpret)  # [B, K, T G, D]
    else:
        out = combine_splits_reference(o, m, l).astype(q.dtype)
    return out.reshape(b, kv_heads, t, g, d).transpose(0, 2, 1, 3, 4).reshape(q.shape)


def flash_decode_reference(
    q: jax.Array, k: Store, v: Store, q_positions: jax.Array, *, sliding_window: int | None = None
) -> jax.Array:
    """Plain-JAX twin of `flash_decode`: dequantize to q's dtype, then
    `attention.attention_reference`. With a float32 q it is the exact oracle (float32
    dequantization and softmax throughout). Returns q's shape and dtype."""
    k_dense = kv_cache.decode_store(k, q.dtype)  # [B, S, K, D]
    v_dense = kv_cache.decode_store(v, q.dtype)
    if q.ndim == 4:  # [B, T, H, D] at consecutive positions from the first
        positions = q_positions[:, :1] + jnp.arange(q.shape[1], dtype=q_positions.dtype)
        return attention.attention_reference(q, k_dense, v_dense, positions, sliding_window=sliding_window)
    out = attention.attention_reference(
        q[:, None], k_dense, v_dense, q_positions[:, None], sliding_window=sliding_window
    )  # [B, 1, H, D]
    return out[:, 0]


# ------------------------------------------------------------------------------- bench


def _random_store(key, side: str, shape: tuple[int, ...], group: int) -> Store:
    """A store of kv_cache side format `side` (bf16, fp16, int8, int4, kivi4) with random
    contents for values of `shape` [B, S, K, D], its arrays shaped as
    `kv_cache.empty_store`'s (a kivi4 store with its last group in the residual); speed
    does not depend on the values."""
    like = jax.eval_shape(lambda: kv_cache.empty_store(side, shape, group))
    k1, k2 = jax.random.split(key)
    if isinstance(like, Dense):
        return Dense(jax.random.normal(k1, like.x.shape, like.x.dtype))
    q = jax.random.bits(k1, like.q.shape, like.q.dtype)  # packed words
    if isinstance(like, Int8):
        return Int8(q, jax.random.uniform(k2, like.scale.shape, like.scale.dtype, 0.005, 0.02))
    # Scales in [0.01, 0.2), zero points in [-1.5, -0.5): bounds along scale_zero's pair axis.
    pair = (2, 1) if isinstance(like, Kivi4) else (2,)
    lo, hi = jnp.array([0.01, -1.5]).reshape(pair), jnp.array([0.2, -0.5]).reshape(pair)
    scale_zero = jax.random.uniform(k2, like.scale_zero.shape, like.scale_zero.dtype, lo, hi)
    if isinstance(like, Kivi4):
        return Kivi4(q, scale_zero, jax.random.normal(k1, like.residual.shape, like.residual.dtype),
                     jnp.full(like.flushed.shape, shape[1] - like.group, jnp.int32))
    return Int4(q, scale_zero)


def _seconds_per_call(fn, arg_sets: list[tuple], samples: int) -> tuple[float, float | None, jax.Array]:
    """(seconds per call of `fn`, GPU busy seconds per call, its output for arg_sets[0]). `fn` runs once per argument
    tuple, back to back inside one jitted program (distinct inputs, so nothing is CSE'd);
    that program over the first third of the tuples and over all of them are each timed
    `samples` times (median), and the difference is divided by the extra calls. The
    slope drops the fixed cost of a run (dispatching a program of many arguments, the
    final sync: about 30 us a call when 16 calls shared it) and keeps what a model's
    step pays per call: the kernel, the combine, the gaps between launches. The busy time
    (`bench.common.device_busy_seconds` of the shorter program, None off the GPU) is the
    kernels' own: the two side by side say how much of a call is launch and gap."""

    from bench import common  # on sys.path once main() runs

    many = jax.jit(lambda sets: [fn(*a) for a in sets])
    third = len(arg_sets) // 3
    t1 = common.median_seconds(lambda: many(arg_sets[:third]), samples)
    t3 = common.median_seconds(lambda: many(arg_sets), samples)
    busy = common.device_busy_seconds(lambda: many(arg_sets[:third]))
    return (t3 - t1) / (len(arg_sets) - third), None if busy is None else busy / third, many(arg_sets[:third])[0]


def _seconds_per_call_in_loop(fn, q, k, v, calls: int, samples: int) -> float:
    """Seconds per call of `fn` run `calls` times in one `lax.fori_loop`, each call's query
    chained on the previous output (as a model's decode loop runs it; XLA may run the
    loop body as a graph, with no host launch per call); median of `samples` runs, after
    a compiling run. The sweep reports it beside the slope of `_seconds_per_call`: the
    two disagreed at batch 1, 128k in bench/kv_quant.py's timing (see
    bench/results/2026-11-27-h200-kv_quant-status.md)."""

    from bench import common  # on sys.path once main() runs

    def body(_, carry):  # the next query depends on this output, so no call is hoisted or skipped
        qc, k, v = carry
        return (qc + 1e-30 * fn(qc, k, v).astype(jnp.float32)).astype(qc.dtype), k, v

    # K and V are arguments, not closed over: as constants they would be baked into the
    # executable (GBs at batch 8, 128k: minutes of compiling, an unserialisable program).
    loop = jax.jit(lambda qc, k, v: lax.fori_loop(0, calls, body, (qc, k, v))[0])
    return common.median_seconds(lambda: loop(q, k, v), samples) / calls


# The sweep's columns for Config's fields, in their order.
_KNOB_HEADERS = ("block_s", "splits", "warps", "stages", "ahead", "T", "MW", "CK")


def _ints(text: str | None) -> list[int | None]:
    return [None] if text is None else [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    import argparse
    import gc
    import itertools
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import common

    parser = argparse.ArgumentParser(description="Sweep flash_decode against the copy bandwidth and XLA.")
    parser.add_argument("--batch", default="1,8", help="comma list")
    parser.add_argument("--lengths", default="8192,32768,131072", help="comma list: cache max_len = context")
    parser.add_argument("--formats", default="bf16,int8,int4", help="kv_cache formats: bf16,int8,int4-g32,k8v4,...")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    knob_help = "comma list (the product of all knob lists is swept); default: the shipped default"
    parser.add_argument("--block-s", help=knob_help)
    parser.add_argument("--num-splits", help=knob_help)
    parser.add_argument("--num-warps", help=knob_help)
    parser.add_argument("--num-stages", help=knob_help)
    parser.add_argument("--scales-ahead", help=knob_help + " (1 or 0)")
    parser.add_argument("--transposed", help=knob_help + " (1 or 0: scores as K . q^T)")
    parser.add_argument("--masked-words", help=knob_help + " (1 or 0: quantized words loaded under the mask)")
    parser.add_argument("--combine-kernel", help=knob_help + " (1 or 0: the splits merged by one kernel or by XLA)")
    parser.add_argument("--samples", type=int, default=30, help="timed runs; the median is reported")
    parser.add_argument("--calls", type=int, default=16, help="kernel calls per timed run (at least enough "
                        "cache copies to cycle through 256 MiB, so repeats do not hit L2)")
    parser.add_argument("--no-reference", action="store_true", help="skip XLA's reference")
    parser.add_argument("--kernels", action="store_true", help="also print each call's kernels and their GPU time")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test of this script (pass tiny --lengths, e.g. 256)")
    args = parser.parse_args(argv)

    torch_bw = None if args.interpret else common.torch_copy_bandwidth_in_child(1 << 30)  # before jax takes the GPU
    env = common.environment()
    common.print_environment(env)
    card = env["jax_device_kind"]
    copy_bw = torch_bw or common.jax_copy_bandwidth(1 << (20 if args.interpret else 30))
    print(f"ceiling     {'torch copy_' if torch_bw else 'jax copy (x + 1)'} of a 1 GiB buffer, read + write: "
          f"{copy_bw / 1e9:.0f} GB/s on {card}")
    h, kv_heads, d = args.heads, args.kv_heads, args.head_dim
    # One list per Config field, in its order (the flags are named after the fields).
    knob_sets = list(itertools.product(*(_ints(getattr(args, f.name)) for f in dataclasses.fields(Config))))
    headers = ["B", "L", "format", *_KNOB_HEADERS, "us", "GB/s", "% copy", "loop us", "loop % copy", "busy us",
               "busy % copy", "XLA us", "XLA GB/s", "x XLA", "max|err| vs XLA"]
    rows, best = [], {}
    key = jax.random.key(0)
    for b, length, fmt_name in itertools.product(_ints(args.batch), _ints(args.lengths), args.formats.split(",")):
        fmt = kv_cache.parse_format(fmt_name)
        group = fmt.group  # empty_store clamps an int4 group to D (a kivi4 group counts tokens)
        shape = (b, length, kv_heads, d)  # [B, S, K, D]
        nbytes = _cache_bytes(b, length, fmt_name, kv_heads, d)  # all L slots are visible
        copies = 1 if args.interpret else -(-(256 << 20) // nbytes)
        caches = [(_random_store(jax.random.fold_in(key, 2 * i), fmt.k, shape, group),
                   _random_store(jax.random.fold_in(key, 2 * i + 1), fmt.v, shape, group)) for i in range(copies)]
        calls = 3 * max(args.calls, copies)  # 3x: see _seconds_per_call
        q_dtype = jnp.float16 if "fp16" in (fmt.k, fmt.v) else jnp.bfloat16
        qs = [jax.random.normal(jax.random.fold_in(key, 1000 + i), (b, h, d), q_dtype) for i in range(calls)]
        pos = jnp.full((b,), length - 1, jnp.int32)
        arg_sets = [(qs[i], *caches[i % copies]) for i in range(calls)]

        ref_s = expected = None
        if not args.no_reference:
            ref_fn = lambda q, k, v: flash_decode_reference(q, k, v, pos)  # noqa: E731
            try:
                ref_s, _, expected = _seconds_per_call(ref_fn, arg_sets, args.samples)
                expected = expected.astype(jnp.float32)
            except Exception as e:  # e.g. out of memory: still time the kernel
                print(f"XLA reference, B={b} L={length} {fmt_name}: {type(e).__name__}: {str(e)[:200]}")
        kinds = ["dense" if side in kv_cache.DENSE_DTYPES else side for side in (fmt.k, fmt.v)]
        for knobs in knob_sets:
            cfg = resolve_config(*kinds, b, kv_heads, length, *knobs, token_group=fmt.group)
            kernel = functools.partial(flash_decode, **dataclasses.asdict(cfg), interpret=args.interpret)
            fn = lambda q, k, v: kernel(q, k, v, pos)  # noqa: E731
            try:
                t, busy, got = _seconds_per_call(fn, arg_sets, args.samples)
                got = got.astype(jnp.float32)
                t_loop = _seconds_per_call_in_loop(fn, *arg_sets[0], calls // 3, args.samples)
            except Exception as e:  # a knob setting Triton rejects (e.g. too much shared memory)
                print(f"B={b} L={length} {fmt_name} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                continue
            if args.kernels and not args.interpret:  # what a call's busy time is made of
                one = jax.jit(fn)
                for r in common.kernel_table(common.device_kernel_events(lambda: one(*arg_sets[0]), reps=5), per=5):
                    print(f"    {r['us_per']:8.1f} us  {r['calls_per']:.0f}x  {r['kernel'][:90]}")
            err = "-" if expected is None else f"{float(jnp.max(jnp.abs(got - expected))):.1e}"
            rows.append([b, length, fmt_name, *dataclasses.astuple(cfg),
                         f"{t * 1e6:.1f}", f"{nbytes / t / 1e9:.0f}", f"{100 * nbytes / t / copy_bw:.0f}",
                         f"{t_loop * 1e6:.1f}", f"{100 * nbytes / t_loop / copy_bw:.0f}",
                         "-" if busy is None else f"{busy * 1e6:.1f}",
                         "-" if busy is None else f"{100 * nbytes / busy / copy_bw:.0f}",
                         "-" if ref_s is None else f"{ref_s * 1e6:.1f}",
                         "-" if ref_s is None else f"{nbytes / ref_s / 1e9:.0f}",
                         "-" if ref_s is None else f"{ref_s / t:.2f}", err])
            print(" | ".join(map(str, rows[-1])), flush=True)
            if t < best.get((b, length, fmt_name), (float("inf"),))[0]:
                best[(b, length, fmt_name)] = (t, cfg)
        del caches, arg_sets, qs, expected
        gc.collect()

    print(f"\nflash_decode on {card}: H={h}, K={kv_heads}, D={d}; the query at position L-1 of an L-slot "
          f"cache; GB/s = K and V bytes read (data, scales, zeros) / time; % copy = of the {copy_bw / 1e9:.0f} "
          f"GB/s measured above; x XLA = XLA reference time / kernel time; per-call time = slope between "
          f"runs of N and 3N calls, N >= {args.calls} (medians of {args.samples}); loop us = N calls chained "
          f"through the query in one fori_loop; busy us = GPU busy time per call in a profiler trace (kernels "
          f"and the combine, no launch gaps)")
    print(common.format_table(headers, rows))
    if len(knob_sets) > 1 or len(best) > 1:
        print("\nbest configuration per case; x bf16 = bf16 kernel time / this format's kernel time")
        summary = []
        for (b, length, fmt_name), (t, cfg) in best.items():
            base = best.get((b, length, "bf16"))
            summary.append([b, length, fmt_name, *dataclasses.astuple(cfg),
                            f"{t * 1e6:.1f}", f"{100 * _cache_bytes(b, length, fmt_name, kv_heads, d) / t / copy_bw:.0f}",
                            "-" if base is None else f"{base[0] / t:.2f}"])
        print(common.format_table(["B", "L", "format", *_KNOB_HEADERS, "us", "% copy", "x bf16"], summary))


def _cache_bytes(batch: int, length: int, fmt_name: str, kv_heads: int, head_dim: int) -> int:
    """Bytes of K and V (data, scales, zeros) of a [B, L, K, D] cache in format `fmt_name`."""
    fmt = kv_cache.parse_format(fmt_name)
    group = fmt.group  # empty_store clamps an int4 group to D (a kivi4 group counts tokens)
    shape = (batch, length, kv_heads, head_dim)
    stores = jax.eval_shape(lambda: tuple(kv_cache.empty_store(side, shape, group) for side in (fmt.k, fmt.v)))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(stores))


if __name__ == "__main__":
    main()
