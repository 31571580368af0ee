#!/usr/bin/env bash
# GPU checks for the fused kernels and the benchmark, in one go (the device machine's python3 has
# torch, triton and transformers; hqq is not needed). Logs go to $OUT (or ./gpu_logs).
#   bash scripts/gpu_check.sh [quick]      quick: skip the kernel sweep and the --prefetch 0 run
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PY:-python3}
REPEAT=${REPEAT:-2}
step() { echo; echo "=== $1 ($(date +%T))"; }

{
  step env
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total,driver_version --format=csv
  step "kernel tests (CUDA)"
  timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "cuda or fallback" 2>&1 | tail -n 15
  step "compile for sm_75 (T4) and sm_90"
  timeout 120 $PY scripts/kernel_bench.py compile --arch 75 --arch 90 --out /tmp/cubins 2>&1 | grep -v -i warn
} 2>&1 | tee "$OUT/checks.txt"

step "bench --compare --routing iid" | tee "$OUT/bench_compare_iid.txt"
timeout 280 $PY -m mixtral_nb.bench --compare --routing iid --repeat "$REPEAT" --json "$OUT/compare_iid.json" 2>&1 \
  | tee -a "$OUT/bench_compare_iid.txt"

step "bench --resident" | tee "$OUT/bench_resident.txt"
timeout 150 $PY -m mixtral_nb.bench --resident --repeat "$REPEAT" --json "$OUT/resident.json" 2>&1 \
  | tee -a "$OUT/bench_resident.txt"

if [ "${1:-}" != quick ]; then
  step "kernel micro-benchmarks" | tee "$OUT/kernel_bench.txt"
  timeout 200 $PY scripts/kernel_bench.py bench --sweep 2>&1 | grep -v -i warn | tee -a "$OUT/kernel_bench.txt"
  step "bench ours --routing iid --prefetch 0" | tee "$OUT/bench_iid_p0.txt"
  timeout 150 $PY -m mixtral_nb.bench --routing iid --prefetch 0 --repeat "$REPEAT" --json "$OUT/iid_p0.json" 2>&1 \
    | tee -a "$OUT/bench_iid_p0.txt"
fi
step "summary"
grep -h -E "^=== bench|decode_tok_s|prefill_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|t4_projected|peak_vram|h2d_gbps|wait_s|overhead_s" \
  "$OUT"/bench_*.txt
grep -E "^(expert|attn)" "$OUT/kernel_bench.txt" 2>/dev/null | tail -n 40
