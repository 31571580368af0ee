#!/usr/bin/env bash
# Session 4, last call: dp4a tiles of rows that share their scale meta (MIXTRAL_NB_GEMV=dp4a_shared)
# against consecutive rows (dp4a, the default): CUDA kernel tests, Decoder check, GEMV timings, T4-budget A/B.
source "$(dirname "$0")/gpu_common.sh"
{ step "kernel tests on CUDA"
  kernel_tests "grouped_cuda or shared_x_cuda or qlinear_cuda" 120
  step "decoder check (quantized, 1 and 2 GPUs)"
  decoder_check
  step "GEMV methods"; timeout 100 $PY scripts/kernel_bench.py bench --methods 2>&1 | tail -n 40
} 2>&1 | tee "$OUT/checks.txt"
for m in dp4a_shared dp4a; do
  step "T4 budget, iid, MIXTRAL_NB_GEMV=$m"
  MIXTRAL_NB_GEMV=$m timeout 80 $PY -m mixtral_nb.bench --routing iid --repeat 2 --new-tokens 64 2>&1 | grep -E "decode_tok_s|efficiency|transfer_limit"
done 2>&1 | tee "$OUT/ab.txt"
