#!/usr/bin/env bash
# Session 3, after the multi-GPU fix of the fused kernels: checks on both GPUs, then issue 8's pair of runs.
source "$(dirname "$0")/gpu_common.sh"
KEYS="decode_tok_s|\.hit_rate|efficiency|transfer_limit|peak_vram|overhead_s|host_syncs|outputs_finite|devices"
step "fused + grouped tests"; timeout 60 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "fused_cuda or grouped_cuda" 2>&1 | tail -n 1
step "decoder check"; timeout 100 $PY scripts/gpu_engine_check.py decoder --quantized .gpuassets/tinyq --json "$OUT/decoder_q.json" 2>&1 | grep -v -i warn | tail -n 1
step "two GPUs, 15 GiB cap each, every expert resident" | tee "$OUT/bench_two_gpus.txt"
timeout 100 $PY -m mixtral_nb.bench --devices cuda:0,cuda:1 --offload-per-layer 0 --routing iid --repeat 3 --new-tokens 64 \
  --json "$OUT/two_gpus.json" 2>&1 | grep -v -i warn | tee -a "$OUT/bench_two_gpus.txt" | grep -E "$KEYS"
step "one GPU, T4 budget" | tee "$OUT/bench_one_gpu.txt"
timeout 120 $PY -m mixtral_nb.bench --routing iid --repeat 3 --new-tokens 64 --json "$OUT/one_gpu.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_one_gpu.txt" | grep -E "$KEYS"
