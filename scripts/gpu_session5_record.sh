#!/usr/bin/env bash
# Session 5 record run (2-GPU machine, benches on cuda:0): GEMV methods and grouped block shapes with the
# unmasked (EVEN) dp4a tiles, then issue 7's T4-budget comparison for dp4a and dp4a_shared, twice each
# in alternation (medians of 2 decode runs per process), then the resident floor.
source "$(dirname "$0")/gpu_common.sh"
{ step env; $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())"
  step "GEMV methods"; timeout 110 $PY scripts/kernel_bench.py bench --methods 2>&1 | grep -v -i warn
  step "grouped block shapes"; timeout 60 $PY scripts/kernel_bench.py bench --shapes 2>&1 | grep -v -i warn
} 2>&1 | tee "$OUT/gemv.txt"
for run in 1 2; do
  for m in dp4a_shared dp4a; do
    MIXTRAL_NB_GEMV=$m compare_step "compare_${m}_$run" 100 --repeat 2
  done
done
step "one GPU, no cap: --resident" | tee "$OUT/bench_resident.txt"
timeout 60 $PY -m mixtral_nb.bench --resident --repeat 3 --new-tokens 64 --json "$OUT/resident.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_resident.txt" | grep -E "decode_tok_s|host_syncs|peak_vram"
