#!/usr/bin/env bash
# Session 4, one call on a 2-GPU machine: checks of the fused router / expert sum / shared q,k,v input /
# per-token prep graph, the T4-budget record comparison, a profile cut by trace_gaps.py, and A/B of
# clean_window and split_copies.
source "$(dirname "$0")/gpu_common.sh"
{ step "kernel + fused tests on CUDA"
  kernel_tests "fused_cuda or shared_x_cuda or grouped_cuda" 100
  step "decoder check (quantized, 1 and 2 GPUs)"
  decoder_check
} 2>&1 | tee "$OUT/checks.txt"
compare_step compare_iid 170 --repeat 3
step "profile (ours, iid, 15 GiB cap)"
timeout 80 $PY -m mixtral_nb.bench --routing iid --repeat 1 --new-tokens 32 --profile "$OUT/prof.txt" 2>&1 | grep -E "decode_tok_s|efficiency"
$PY scripts/trace_gaps.py "$OUT/prof.txt.trace.json" && gzip -f "$OUT/prof.txt.trace.json"
for variant in "--clean-window 4" "--split-copies"; do
  step "A/B: $variant"
  timeout 70 $PY -m mixtral_nb.bench --routing iid --repeat 2 --new-tokens 64 $variant 2>&1 | grep -E "decode_tok_s|efficiency|d2h_bytes|h2d_busy"
done 2>&1 | tee "$OUT/ab.txt"
step "one GPU, no cap: --resident" | tee "$OUT/bench_resident.txt"
timeout 60 $PY -m mixtral_nb.bench --resident --repeat 2 --new-tokens 64 --json "$OUT/resident.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_resident.txt" | grep -E "decode_tok_s|host_syncs"
