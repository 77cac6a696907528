#!/usr/bin/env bash
# The GPU measurements still open in issues 3-5, as parts that each fit one 10-minute
# device command (run them back to back: the machine is handed back after 30 s idle,
# and the XLA compilation cache in /tmp/jcc only lives while it is held).
#
#   bash bench/gpu_session.sh a    compiled-kernel tests, append sweep (exactness), prefill 4k+16k
#   bash bench/gpu_session.sh b    speculative prompt lookup on SmolLM2 (needs the GGUF, see below)
#   bash bench/gpu_session.sh c    kv_quant (append, attention, e2e) + end-to-end prefill at 16k
#   bash bench/gpu_session.sh d    speculative draft-model cost model (8B / 1B shapes), prefill 64k
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
    step 170 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_flash_prefill.py tests/test_flash_decode.py \
      tests/test_quantize_append.py
    step 150 qa_sweep python3 -m pallas_kernels.quantize_append --budget-s 100
    step 260 prefill_4k_16k python3 bench/prefill.py --seq 4096 16384 --out "$OUT/"
    ;;
  b)
    step 330 spec_lookup python3 bench/speculative.py --part lookup --model "${SMOL_GGUF:-/tmp/spec/smol.gguf}" \
      --essays "${ESSAYS:-downloads/PaulGrahamEssays}" --out "$OUT/"
    ;;
  c)
    step 330 kv_quant python3 bench/kv_quant.py --out "$OUT/"
    step 240 prefill_e2e python3 bench/decode.py --models 1b 8b --batch 1 --prompt-len 16384 --new-tokens 8 \
      --no-hf --reps 3 --copy-gib 0.5 --out "$OUT/prefill16k-e2e.json"
    ;;
  d)
    # Fewer draft lengths and verify widths than the defaults: 8B compiles dominate.
    step 470 spec_shapes python3 bench/speculative.py --part shapes --fit-gammas 1 2 3 4 6 \
      --verify-widths 1 2 3 4 5 7 --out "$OUT/"
    step 110 prefill_64k python3 bench/prefill.py --seq 65536 --patterns "dense causal" "window 1024" strided --out "$OUT/"
    ;;
  *)
    sed -n 2,16p "$0"; exit 2 ;;
esac
