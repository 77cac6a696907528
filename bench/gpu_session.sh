#!/usr/bin/env bash
# The GPU measurements still open in issues 3-5, as parts that each fit one 10-minute
# device command (run them back to back: the machine is handed back after 30 s idle,
# and the XLA compilation cache in /tmp/jcc only lives while it is held).
#
#   bash bench/gpu_session.sh a    decode + append kernel tests compiled, decode sweep at the shipped defaults
#                                  (with XLA's reference; prints busy time), append sweep (exactness)
#   bash bench/gpu_session.sh b    speculative prompt lookup on SmolLM2 (needs the GGUF, see below)
#   bash bench/gpu_session.sh c    kv_quant end to end (8B, batch 8, 32k) + end-to-end prefill at 16k
#   bash bench/gpu_session.sh d    speculative draft-model cost model (8B / 1B shapes; bf16 and int8 drafts)
#   bash bench/gpu_session.sh e    bf16 decode splits at batch 1, prefill attention at 4k, 16k, 64k
#   bash bench/gpu_session.sh f    bf16 beside int8/int4 decode tuning at 128k (scale loads, block size), batch 1 and 8
#   bash bench/gpu_session.sh g    the next knobs: int8 decode warps/blocks/stages, int4 transposed, append tiles
#   bash bench/gpu_session.sh h    the batch-1 decode step of the 1B and 8B shapes, kernel by kernel (decode_profile.py)
#   bash bench/gpu_session.sh i    the fused norm + q/k/v + RoPE kernel: its tests compiled, its sweep beside XLA, the 1B step
#   bash bench/gpu_session.sh j    kernel tests compiled, the 128k decode defaults (int4 transposed), append at 4 and 8 warps
#   bash bench/gpu_session.sh k    the 1B step with int8 weight-only matrices beside bf16, kernel by kernel
#   bash bench/gpu_session.sh l    gemv_int8: its tests compiled, its tiles / warps beside XLA's dots, the 1B int8 step
#   bash bench/gpu_session.sh m    gemv_int8 sweep: rows a program (warps following), splits, words a step
#   bash bench/gpu_session.sh n    gemv_int8 defaults and GLU, the 1B step with all or the MLP/head matrices in int8
#   bash bench/gpu_session.sh o    the record at the shipped defaults: every format at 128k, batch 1 and 8, then
#                                  end to end (8B, batch 8, 32k) with bf16, int8, int4, kivi4-g64
#   bash bench/gpu_session.sh p    gemv_int8 at 1-4 pipeline stages (its fixed cost per call)
#   bash bench/gpu_session.sh q    speculative cost model, int8 draft, its steps unrolled (fixed draft length)
#   bash bench/gpu_session.sh r    flash_decode with several queries (tests compiled), then part q's cost model
#   bash bench/gpu_session.sh s    flash_decode reading kivi4 keys: tests compiled, 128k beside bf16 and int4, its knobs
#   bash bench/gpu_session.sh t    kv_quant end to end (8B, batch 8, 32k) with kivi4 beside bf16, int8 and int4
#   bash bench/gpu_session.sh u    the 128k decode defaults of every format side by side, kivi4 end to end again
#   bash bench/gpu_session.sh v    int4-g64 quantize-and-append: tokens, heads and warps a program at both shapes
#   bash bench/gpu_session.sh w    4-bit decode at 2 warps and 3 stages (the 4-bit default since session 9): its
#                                  compiled tests, then timed against 4 warps and bf16 at 128k
#   bash bench/gpu_session.sh x    every compiled decode test at the defaults, the 128k defaults of every format,
#                                  4-bit splits around their default
#   bash bench/gpu_session.sh y    quantized words loaded unmasked (masked_words=0): compiled tests, 128k timed
#                                  against masked loads in every format, int8 with scores transposed at 2 warps
#   bash bench/gpu_session.sh z    the append with rcp.rn.f32: compiled tests, both shapes (and int4 tiles);
#                                  int8 decode at batch 8, words masked or not, more samples
#   bash bench/gpu_session.sh za   the append at its session-9 defaults (one token, one warp a program): compiled
#                                  tests, both shapes beside XLA
#   bash bench/gpu_session.sh zb   int4 as fp16 subnormals and V words gathered transposed (session 10): every
#                                  compiled decode test, the 128k defaults of every format
#   bash bench/gpu_session.sh zc   4-bit decode at one warp a program and 64-slot blocks, splits and stages, at 128k
#   bash bench/gpu_session.sh zd   quantized stores head-major (session 10): compiled decode and append tests,
#                                  the 128k decode defaults of every format
#   bash bench/gpu_session.sh ze   head-major: append tiles at both shapes, 4-bit splits at 128k (4-6 programs an SM)
#   bash bench/gpu_session.sh zf   head-major: the record, every format at 128k, then end to end (as part o);
#                                  int4 at batch 1 in 64-slot blocks
#   bash bench/gpu_session.sh zg   int4 at 64-slot blocks, 8 programs an SM (session 10): compiled decode tests,
#                                  the 128k defaults of every format, kivi4-g64 at its session-9 splits
#   bash bench/gpu_session.sh zh   the splits merged in one Pallas kernel (session 11): compiled decode tests, the 128k
#                                  defaults of every format beside XLA's combine, kernel by kernel; int4 batch 1 at 1 warp
#   bash bench/gpu_session.sh zi   int4 and kivi4 (scale, zero) pairs in one array (session 11): compiled decode and
#                                  append tests, the 128k defaults of every format kernel by kernel, the streams probe
#   bash bench/gpu_session.sh zk   positions (and kivi4's flushed) read whole by the decode kernel: its compiled tests,
#                                  the 128k defaults kernel by kernel, 4-bit splits at batch 1 around the defaults
#   bash bench/gpu_session.sh zj   decode defaults at 32k, the append at its defaults (both shapes, beside XLA), then
#                                  end to end (as part o)
#   bash bench/gpu_session.sh zl   the decode loop beside XLA's einsum and jax's Pallas gqa (kv_quant.py --parts
#                                  attention), every format, batch 8 and 1, 128k, 32k, 8k
#
# Logs and result files go to $OUT (default bench/results/new); copy them into
# bench/results/ afterwards. Part b expects SMOL_GGUF (default /tmp/spec/smol.gguf) and
# ESSAYS (default downloads/PaulGrahamEssays); bench/README.md says how to carry the
# 98 MB GGUF in two halves.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/new}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jcc}
quiet() { grep -v -i -e "warning" -e "deprecat"; }
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | quiet | tee "$OUT/$name.log" | tail -25
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/card.txt" 2>/dev/null || true
case "${1:-}" in
  a)
    step 150 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py tests/test_quantize_append.py
    step 200 fd_defaults python3 -m pallas_kernels.flash_decode --formats bf16,int8,int4 --lengths 8192,32768,131072 \
      --samples 10 --calls 6
    step 110 qa_sweep python3 -m pallas_kernels.quantize_append --budget-s 80 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int8 int4-g64 bf16 --kv-formats int8
    ;;
  f)
    # 128k, batch 1 and 8: bf16 at its shipped default beside int8 and int4 (both read as
    # words) over scale loads (in their block or a block ahead), block size and stages.
    for b in 1 8; do
      F="python3 -m pallas_kernels.flash_decode --batch $b --lengths 131072 --samples 10 --calls 4 --no-reference"
      step 100 fd_b${b}_bf16 $F --formats bf16
      step 150 fd_b${b}_int8 $F --formats int8 --scales-ahead 0,1 --block-s 64 --num-stages 3
      step 250 fd_b${b}_int4 $F --formats int4 --scales-ahead 0,1 --block-s 64,128 --num-stages 3
    done
    ;;
  g)
    # The next knobs (bench/results/2026-11-27-h200-kv_quant-status.md, session 4 "Next
    # steps"): int8 decode at 2 warps and 32-slot blocks, int4 transposed (scores as
    # K . q^T), the append's tile and warps.
    for b in 1 8; do
      step 150 fd_b${b}_int8_knobs python3 -m pallas_kernels.flash_decode --batch $b --lengths 131072 --samples 10 \
        --calls 4 --no-reference --formats bf16,int8 --num-warps 2,4 --block-s 32,64 --num-stages 3,4
    done
    for b in 1 8; do
      step 120 fd_b${b}_int4_transposed python3 -m pallas_kernels.flash_decode --batch $b --lengths 131072 \
        --samples 10 --calls 4 --no-reference --formats bf16,int4 --transposed 0,1 --scales-ahead 0,1
    done
    step 200 qa_tiles python3 -m pallas_kernels.quantize_append --budget-s 150 --shapes 1,16384,8,128,32768 \
      --formats int8 int4-g64 --kv-formats int8 --block-t 8 16 32 --num-warps 4 8
    ;;
  h)
    # Where the 1B draft's (and the 8B target's) batch-1 step goes, kernel by kernel.
    step 200 profile_1b python3 bench/decode_profile.py --model 1b --out "$OUT/"
    # The q / k+v / o GEMVs run as XLA reduction fusions at ~2.2 TB/s: do Triton GEMMs do better?
    XLA_FLAGS="--xla_gpu_triton_gemm_any=true" step 200 profile_1b_triton_gemm_any \
      python3 bench/decode_profile.py --model 1b --top 12
    step 250 profile_8b python3 bench/decode_profile.py --model 8b --new-tokens 64 --out "$OUT/"
    ;;
  i)
    step 120 norm_qkv_tests python3 -m pytest -q -p no:cacheprovider tests/test_norm_qkv.py
    step 200 norm_qkv_sweep python3 -m pallas_kernels.norm_qkv --rows 1,5 --block-e 128,256
    step 200 profile_1b python3 bench/decode_profile.py --model 1b --out "$OUT/"
    ;;
  j)
    step 150 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py tests/test_quantize_append.py \
      tests/test_norm_qkv.py
    step 100 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 \
      --formats bf16,int8,int4 --samples 10 --calls 4 --no-reference
    step 200 qa_warps python3 -m pallas_kernels.quantize_append --budget-s 150 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int8 int4-g64 --kv-formats int8 --block-t 4 8 --num-warps 4 8
    ;;
  k)
    step 200 profile_1b python3 bench/decode_profile.py --model 1b --top 12 --out "$OUT/"
    step 200 profile_1b_int8 python3 bench/decode_profile.py --model 1b --weights int8 --top 16 --out "$OUT/"
    ;;
  l)
    step 150 weights_tests python3 -m pytest -q -p no:cacheprovider tests/test_weights.py
    step 200 gemv_tiles python3 -m pallas_kernels.gemv_int8 --rows 1 --block-n 16,32,64 --block-kw 64,128
    step 150 gemv_warps python3 -m pallas_kernels.gemv_int8 --rows 1,5 --num-warps 2,4,8 --transposed 0,1
    step 150 profile_1b_int8 python3 bench/decode_profile.py --model 1b --weights int8 --top 16 --out "$OUT/"
    ;;
  m)
    # gemv_int8 with one warp per 16 rows (the mma's M): rows a program, splits of K, words a step.
    step 400 gemv_sweep python3 -m pallas_kernels.gemv_int8 --rows 1 --block-n 16,32,64 --num-splits 1,2,4 \
      --block-kw 64,128,256
    ;;
  n)
    # gemv_int8 at its new defaults (one warp, 64 words a step, 512 programs) and the GLU
    # form; the 1B step with every matrix in int8, and with the MLP and LM head only.
    step 100 weights_tests python3 -m pytest -q -p no:cacheprovider tests/test_weights.py
    step 120 gemv_defaults python3 -m pallas_kernels.gemv_int8 --rows 1,5 --glu
    step 120 profile_1b_int8 python3 bench/decode_profile.py --model 1b --weights int8 --top 12 --out "$OUT/"
    step 120 profile_1b_int8_mlp python3 bench/decode_profile.py --model 1b --weights int8 --top 12 \
      --int8-matrices w_gate w_up w_down embedding lm_head --out "$OUT/"
    ;;
  p)
    # Where gemv_int8's ~4 us fixed cost comes from: the software pipeline's depth.
    step 150 gemv_stages python3 -m pallas_kernels.gemv_int8 --rows 1 --shapes q "gate|up" down --num-stages 1,2,3,4
    ;;
  q)
    # A fixed draft length unrolls the draft's steps in the round (no while-loop round trip
    # per step); one compilation per g, so fewer draft lengths and verify widths.
    step 580 spec_shapes_unrolled python3 bench/speculative.py --part shapes --fit-loop unrolled --fit-gammas 2 3 4 \
      --verify-widths 3 4 5 --draft-weights int8 --draft-int8-matrices w_gate w_up w_down embedding lm_head \
      --out "$OUT/"
    ;;
  r)
    # The verify pass (T = g + 1) and the draft's two-token first step run flash_decode
    # with several queries a row instead of the prefill path.
    step 100 fd_several_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k "several and not interpret"
    step 480 spec_shapes_unrolled python3 bench/speculative.py --part shapes --fit-loop unrolled --fit-gammas 3 4 \
      --verify-widths 4 5 --draft-weights int8 --draft-int8-matrices w_gate w_up w_down embedding lm_head \
      --out "$OUT/"
    ;;
  s)
    # kivi4 keys (per-channel int4, a token group a block) through flash_decode, beside bf16
    # and int4 at their defaults; then its stages, orientation and splits.
    step 150 fd_kivi_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k "gpu"
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference"
    step 150 fd_kivi_defaults $F --batch 1,8 --formats bf16,int4,kivi4-g64,kivi4-g128
    step 130 fd_kivi_b1_knobs $F --batch 1 --formats kivi4-g64 --num-stages 2,3 --transposed 0,1 --num-splits 66,99,132
    step 110 fd_kivi_b8_knobs $F --batch 8 --formats kivi4-g64 --num-stages 2,3 --transposed 0,1 --num-splits 10,12,16
    ;;
  t)
    step 300 kv_quant_e2e_kivi python3 bench/kv_quant.py --parts e2e --formats bf16 int8 int4 kivi4-g64 --out "$OUT/"
    ;;
  u)
    step 150 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 10 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128
    step 250 kv_quant_e2e_kivi python3 bench/kv_quant.py --parts e2e --formats bf16 int4 kivi4-g64 --out "$OUT/"
    ;;
  v)
    step 280 qa_int4_tiles python3 -m pallas_kernels.quantize_append --budget-s 240 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int4-g64 --kv-formats --block-t 2 4 8 --heads 4 8 16 32 --num-warps 2 4 --no-xla
    ;;
  w)
    # The 2-warp, 3-stage setting for 4-bit words (session 8's candidate, the default since
    # session 9) compiled against the float32 oracle; then timed beside 4 warps, 2 stages and
    # bf16 at 128k, and int4 at 64-slot blocks (168-175 registers at 2 warps offline, against 208).
    step 180 fd_candidate_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py \
      -k "gpu and (int4 or kivi4)"
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference"
    step 130 fd_candidate_b1 $F --batch 1 --formats bf16,int4,kivi4-g64 --num-warps 2,4 --num-stages 2,3
    step 130 fd_candidate_b8 $F --batch 8 --formats bf16,int4,kivi4-g64 --num-warps 2,4 --num-stages 2,3
    step 100 fd_int4_b64 $F --batch 1,8 --formats int4 --block-s 64 --num-warps 2 --num-stages 2,3
    ;;
  x)
    step 200 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference"
    step 150 fd_defaults_128k $F --batch 1,8 --formats bf16,int8,int4,kivi4-g64,kivi4-g128
    step 110 fd_4bit_splits_b1 $F --batch 1 --formats int4,kivi4-g64,kivi4-g128 --num-splits 66,82,99
    step 110 fd_4bit_splits_b8 $F --batch 8 --formats int4,kivi4-g64,kivi4-g128 --num-splits 8,10,12
    ;;
  y)
    step 200 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference"
    step 170 fd_masked_words $F --batch 1,8 --formats bf16,int8,int4,kivi4-g64,kivi4-g128 --masked-words 0,1
    step 150 fd_int8_transposed $F --batch 1,8 --formats int8 --transposed 1 --num-warps 2 --block-s 64,128 \
      --masked-words 0
    ;;
  za)
    step 120 qa_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_quantize_append.py
    step 150 qa_defaults python3 -m pallas_kernels.quantize_append --budget-s 120 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int8 int4-g64 bf16 --kv-formats int8
    ;;
  zb)
    step 240 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    step 200 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 20 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128
    ;;
  zc)
    # One warp a program at 64-slot blocks: no cross-warp reductions or barriers, 168 registers
    # and 11-20 KiB of shared memory (offline), so 8-12 programs an SM; beside the defaults.
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference"
    step 100 fd_defaults $F --batch 1,8 --formats bf16,int4,kivi4-g64
    step 150 fd_4bit_1warp_b1 $F --batch 1 --formats int4,kivi4-g64 --block-s 64 --num-warps 1 --num-stages 2,3 \
      --num-splits 99,132,165,198
    step 150 fd_4bit_1warp_b8 $F --batch 8 --formats int4,kivi4-g64 --block-s 64 --num-warps 1 --num-stages 2,3 \
      --num-splits 12,16,20,24
    ;;
  zd)
    step 200 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    step 150 qa_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_quantize_append.py
    step 200 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 20 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128
    ;;
  ze)
    step 200 qa_tiles python3 -m pallas_kernels.quantize_append --budget-s 170 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int8 int4-g64 --kv-formats int8 --block-t 1 4 8 --heads 1 8 --no-xla
    step 250 qa_tiles_long python3 -m pallas_kernels.quantize_append --budget-s 220 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int8 int4-g64 --kv-formats int8 --block-t 8 16 32 --heads 1 2 --num-warps 1 4 \
      --no-xla
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference"
    step 150 fd_4bit_splits_b1 $F --batch 1 --formats bf16,int4,kivi4-g64 --num-splits 66,82,99
    step 150 fd_4bit_splits_b8 $F --batch 8 --formats bf16,int4,kivi4-g64 --num-splits 8,10,12
    ;;
  zf)
    step 150 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 20 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128
    step 300 kv_quant_e2e python3 bench/kv_quant.py --parts e2e --formats bf16 int8 int4 kivi4-g64 --out "$OUT/"
    step 100 fd_int4_b1_blocks python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 \
      --no-reference --batch 1 --formats int4 --block-s 64 --num-warps 1,2 --num-splits 132,198
    ;;
  zi)
    step 200 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    step 120 qa_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_quantize_append.py
    step 150 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 20 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128 --kernels
    step 60 fd_scale_streams python3 bench/fd_scale_streams.py
    ;;
  zk)
    step 200 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    step 150 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 20 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128 --kernels
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference --batch 1"
    step 100 fd_4bit_splits_b1 $F --formats int4,kivi4-g64 --num-splits 99,132,165
    ;;
  zl)
    step 420 kv_quant_attention python3 bench/kv_quant.py --parts attention --formats bf16 int8 int4 kivi4-g64 \
      --batch 8 1 --context 131072 32768 8192 --copy-gib 1 --reps 5 --inner 12 --out "$OUT/"
    ;;
  zj)
    step 100 fd_defaults_32k python3 -m pallas_kernels.flash_decode --lengths 32768 --batch 1,8 --samples 20 \
      --calls 6 --no-reference --formats bf16,int8,int4,kivi4-g64
    step 150 qa_defaults python3 -m pallas_kernels.quantize_append --budget-s 120 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int8 int4-g64 bf16 --kv-formats int8
    step 300 kv_quant_e2e python3 bench/kv_quant.py --parts e2e --formats bf16 int8 int4 kivi4-g64 --out "$OUT/"
    ;;
  zh)
    step 200 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 10 --calls 4 --no-reference"
    step 200 fd_combine_128k $F --batch 1,8 --formats bf16,int8,int4,kivi4-g64 --combine-kernel 0,1 --kernels
    step 120 fd_int4_b1_1warp $F --batch 1 --formats int4 --num-warps 1 --block-s 32,64 --num-splits 132,198,264
    ;;
  zg)
    step 200 fd_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_decode.py -k gpu
    step 150 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 20 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128
    F="python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 20 --calls 4 --no-reference"
    step 60 fd_kivi_splits_b1 $F --batch 1 --formats kivi4-g64 --num-splits 99
    step 60 fd_kivi_splits_b8 $F --batch 8 --formats kivi4-g64 --num-splits 12
    ;;
  o)
    step 150 fd_defaults_128k python3 -m pallas_kernels.flash_decode --lengths 131072 --batch 1,8 --samples 20 \
      --calls 4 --no-reference --formats bf16,int8,int4,kivi4-g64,kivi4-g128
    step 300 kv_quant_e2e python3 bench/kv_quant.py --parts e2e --formats bf16 int8 int4 kivi4-g64 --out "$OUT/"
    ;;
  z)
    step 120 qa_gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_quantize_append.py
    step 150 qa_defaults python3 -m pallas_kernels.quantize_append --budget-s 120 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int8 int4-g64 bf16 --kv-formats int8
    step 150 qa_int4_tiles python3 -m pallas_kernels.quantize_append --budget-s 120 --shapes 1,16384,8,128,32768 \
      2,2048,32,64,4096 --formats int4-g64 --kv-formats --block-t 2 4 8 --num-warps 2 4 --no-xla
    step 150 fd_int8_masked_b8 python3 -m pallas_kernels.flash_decode --lengths 131072 --samples 20 --calls 4 \
      --no-reference --batch 8,1 --formats bf16,int8 --masked-words 0,1
    ;;
  b)
    step 330 spec_lookup python3 bench/speculative.py --part lookup --model "${SMOL_GGUF:-/tmp/spec/smol.gguf}" \
      --essays "${ESSAYS:-downloads/PaulGrahamEssays}" --out "$OUT/"
    ;;
  c)
    step 240 kv_quant_e2e python3 bench/kv_quant.py --parts e2e --out "$OUT/"
    step 240 prefill_e2e python3 bench/decode.py --models 1b 8b --batch 1 --prompt-len 16384 --new-tokens 8 \
      --no-hf --reps 3 --copy-gib 0.5 --out "$OUT/decode-prompt16k.json"
    ;;
  d)
    # Fewer draft lengths and verify widths than the defaults: 8B compiles dominate.
    step 580 spec_shapes python3 bench/speculative.py --part shapes --fit-gammas 1 2 3 4 6 \
      --verify-widths 1 2 3 4 5 7 --draft-weights bf16 int8 --draft-int8-matrices w_gate w_up w_down embedding \
      lm_head --out "$OUT/"
    ;;
  e)
    step 130 fd_splits python3 -m pallas_kernels.flash_decode --formats bf16 --batch 1 --lengths 32768,131072 \
      --num-splits 33,49,66,99,132 --block-s 64,128 --samples 10 --no-reference
    step 260 prefill_4k_16k python3 bench/prefill.py --seq 4096 16384 --out "$OUT/"
    step 150 prefill_64k python3 bench/prefill.py --seq 65536 --out "$OUT/"
    ;;
  *)
    sed -n '2,/^set -uo/{/^set -uo/!p}' "$0"; exit 2 ;;
esac
