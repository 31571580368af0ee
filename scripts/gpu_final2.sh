#!/usr/bin/env bash
# The record run, on a 2-GPU machine: checks, then issue 7 (one GPU) and issue 8 (two GPUs) numbers
# (sessions 2 and 3; the CUDA kernel-test step was added in session 3).
source "$(dirname "$0")/gpu_common.sh"
{ step env; $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())"
  step "kernel + fused tests on CUDA"
  kernel_tests "fused_cuda or grouped_cuda" 120
  step "split check (transformers forward, 2 GPUs vs 1)"
  timeout 60 $PY scripts/gpu_engine_check.py split --json "$OUT/split.json" 2>&1 | grep -v -i warn | tail -n 1
  step "decoder check (quantized, 1 and 2 GPUs)"
  decoder_check
} 2>&1 | tee "$OUT/checks.txt"
compare_step compare_iid 170 --repeat 3
step "two GPUs, 15 GiB cap each, every expert resident: --devices cuda:0,cuda:1 --offload-per-layer 0 --routing iid" | tee "$OUT/bench_two_gpus.txt"
timeout 100 $PY -m mixtral_nb.bench --devices cuda:0,cuda:1 --offload-per-layer 0 --routing iid --repeat 3 --new-tokens 64 \
  --json "$OUT/two_gpus.json" 2>&1 | grep -v -i warn | tee -a "$OUT/bench_two_gpus.txt" | grep -E "$KEYS"
step "one GPU, no cap: --resident" | tee "$OUT/bench_resident.txt"
timeout 80 $PY -m mixtral_nb.bench --resident --repeat 3 --new-tokens 64 --json "$OUT/resident.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_resident.txt" | grep -E "$KEYS"
