#!/usr/bin/env bash
# Session 3, second GPU pass: the dp4a GEMV (correctness, micro-benchmarks, block sweep), then the model.
source "$(dirname "$0")/gpu_common.sh"
KEYS="decode_tok_s|efficiency|overhead_s|speedup"
{ step kernels
  timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 | tail -n 4
  step methods
  timeout 240 $PY scripts/kernel_bench.py bench --methods ${SWEEP:+--sweep} 2>&1
  step "decoder quantized"
  timeout 100 $PY scripts/gpu_engine_check.py decoder --quantized .gpuassets/tinyq 2>&1 | grep -v -i warn | tail -n 2
} 2>&1 | tee "$OUT/checks.txt"
for m in dp4a words; do
  step "resident $m"; MIXTRAL_NB_GEMV=$m timeout 100 $PY -m mixtral_nb.bench --resident --repeat 2 --new-tokens 64 2>&1 | grep -E "$KEYS"
done 2>&1 | tee "$OUT/resident.txt"
step "iid dp4a"; timeout 150 $PY -m mixtral_nb.bench --routing iid --repeat 2 --new-tokens 64 2>&1 | tee "$OUT/iid.txt" | grep -E "$KEYS"
