#!/usr/bin/env bash
# Second GPU pass (after scripts/gpu_check.sh): kernel check + micro-benchmarks, then the benchmark
# targets, in priority order under one time budget. Logs go to $OUT (or ./gpu_logs).
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PY:-python3}
T0=$(date +%s)
left() { echo $(( ${BUDGET:-250} - ($(date +%s) - T0) )); }
step() { echo; echo "=== $1 ($(date +%T), $(left) s left)"; }

{ step "kernels: correctness on GPU + micro-benchmarks"
  $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
  timeout 60 $PY scripts/kernel_bench.py bench 2>&1 | grep -v -i warn; } | tee "$OUT/kernel_bench.txt"
step "bench --compare --routing iid" | tee "$OUT/bench_compare_iid.txt"
timeout 150 $PY -m mixtral_nb.bench --compare --routing iid --repeat 2 --json "$OUT/compare_iid.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_compare_iid.txt"
step "bench --resident" | tee "$OUT/bench_resident.txt"
timeout $(( $(left) > 20 ? $(left) - 5 : 15 )) $PY -m mixtral_nb.bench --resident --repeat 2 --json "$OUT/resident.json" \
  2>&1 | grep -v -i warn | tee -a "$OUT/bench_resident.txt"
if [ "$(left)" -gt 60 ]; then
  step "bench ours --routing iid --prefetch 0" | tee "$OUT/bench_iid_p0.txt"
  timeout $(( $(left) - 5 )) $PY -m mixtral_nb.bench --routing iid --prefetch 0 --repeat 1 --json "$OUT/iid_p0.json" 2>&1 \
    | grep -v -i warn | tee -a "$OUT/bench_iid_p0.txt"
fi
step summary
grep -h -E "^=== bench|decode_tok_s|prefill_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|t4_projected|peak_vram|pinned_host|h2d_gbps|wait_s|overhead_s|host_syncs|h2d_bytes|prefetch_(recall|precision)" "$OUT"/bench_*.txt
grep -E "rel err|host time|^(expert|attn)" "$OUT/kernel_bench.txt"
