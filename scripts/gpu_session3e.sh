#!/usr/bin/env bash
# Session 3, after the multi-GPU fix of the fused kernels: checks on both GPUs, then issue 8's pair of runs.
source "$(dirname "$0")/gpu_common.sh"
KEYS="decode_tok_s|\.hit_rate|efficiency|transfer_limit|peak_vram|overhead_s|host_syncs|outputs_finite|devices"
step "fused + grouped tests"; kernel_tests "fused_cuda or grouped_cuda" 60
step "decoder check"; decoder_check
step "two GPUs, 15 GiB cap each, every expert resident" | tee "$OUT/bench_two_gpus.txt"
timeout 100 $PY -m mixtral_nb.bench --devices cuda:0,cuda:1 --offload-per-layer 0 --routing iid --repeat 3 --new-tokens 64 \
  --json "$OUT/two_gpus.json" 2>&1 | grep -v -i warn | tee -a "$OUT/bench_two_gpus.txt" | grep -E "$KEYS"
step "one GPU, T4 budget" | tee "$OUT/bench_one_gpu.txt"
timeout 120 $PY -m mixtral_nb.bench --routing iid --repeat 3 --new-tokens 64 --json "$OUT/one_gpu.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_one_gpu.txt" | grep -E "$KEYS"
