#!/usr/bin/env bash
# Session 4, last call: dp4a tiles of rows that share their scale meta (MIXTRAL_NB_GEMV=dp4a_shared)
# against consecutive rows (dp4a, the default): CUDA kernel tests, Decoder check, GEMV timings, T4-budget A/B.
source "$(dirname "$0")/gpu_common.sh"
{ step "kernel tests on CUDA"
  timeout 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "grouped_cuda or shared_x_cuda or qlinear_cuda" 2>&1 | tail -n 2
  step "decoder check (quantized, 1 and 2 GPUs)"
  timeout 100 $PY scripts/gpu_engine_check.py decoder --quantized .gpuassets/tinyq --json "$OUT/decoder_q.json" 2>&1 | grep -v -i warn | tail -n 1
  step "GEMV methods"; timeout 100 $PY scripts/kernel_bench.py bench --methods 2>&1 | tail -n 40
} 2>&1 | tee "$OUT/checks.txt"
for m in dp4a_shared dp4a; do
  step "T4 budget, iid, MIXTRAL_NB_GEMV=$m"
  MIXTRAL_NB_GEMV=$m timeout 80 $PY -m mixtral_nb.bench --routing iid --repeat 2 --new-tokens 64 2>&1 | grep -E "decode_tok_s|efficiency|transfer_limit"
done 2>&1 | tee "$OUT/ab.txt"
