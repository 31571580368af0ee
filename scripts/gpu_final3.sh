#!/usr/bin/env bash
# The session-4 record run, on a 2-GPU machine: checks (CUDA kernel tests, Decoder on 1 and 2 GPUs),
# issue 7's T4-budget comparison twice (two processes, medians of 3 decode runs each), the host probe
# (miss-path host time), a profile cut by trace_gaps.py, the resident floor, the GEMV methods.
source "$(dirname "$0")/gpu_common.sh"
{ step env; $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())"
  step "kernel + fused tests on CUDA"
  kernel_tests "fused_cuda or shared_x_cuda or grouped_cuda" 100
  step "decoder check (quantized, 1 and 2 GPUs)"
  decoder_check
  step "host probe"; timeout 60 $PY scripts/host_probe.py 2>&1 | head -n 14
} 2>&1 | tee "$OUT/checks.txt"
for run in 1 2; do
  compare_step "compare_iid_$run" 170 --repeat 3
done
step "one GPU, no cap: --resident" | tee "$OUT/bench_resident.txt"
timeout 70 $PY -m mixtral_nb.bench --resident --repeat 3 --new-tokens 64 --json "$OUT/resident.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_resident.txt" | grep -E "decode_tok_s|host_syncs|peak_vram"
step "profile (ours, iid, 15 GiB cap)"
timeout 80 $PY -m mixtral_nb.bench --routing iid --repeat 1 --new-tokens 32 --profile "$OUT/prof.txt" 2>&1 | grep -E "decode_tok_s|efficiency"
$PY scripts/trace_gaps.py "$OUT/prof.txt.trace.json" && gzip -f "$OUT/prof.txt.trace.json"
step "GEMV methods"; timeout 100 $PY scripts/kernel_bench.py bench --methods 2>&1 | tee "$OUT/gemv.txt" | tail -n 30
