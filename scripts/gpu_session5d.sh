#!/usr/bin/env bash
# Session 5: EVEN dp4a tiles with the step of 256h+l and one-fma zero points: GEMV shapes, CUDA tests,
# Decoder check (1 and 2 GPUs; also covers _queue_copy and the prefetch route_topk), T4-budget A/B dp4a vs dp4a_shared.
source "$(dirname "$0")/gpu_common.sh"
{ step "dp4a shapes sweep"; timeout 200 $PY scripts/kernel_bench.py bench --shapes 2>&1 | grep -v -i warn | head -n 12
  step "kernel tests on CUDA"; kernel_tests "cuda" 150
  step "decoder check (quantized, 1 and 2 GPUs)"; decoder_check
} 2>&1 | tee "$OUT/checks.txt"
for m in dp4a dp4a_shared; do
  step "T4 budget, iid, MIXTRAL_NB_GEMV=$m"
  MIXTRAL_NB_GEMV=$m timeout 90 $PY -m mixtral_nb.bench --compare --routing iid --repeat 2 --new-tokens 64 2>&1 | grep -E "$KEYS"
done 2>&1 | tee "$OUT/ab.txt"
