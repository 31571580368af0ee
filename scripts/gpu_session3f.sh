#!/usr/bin/env bash
# Session 3, last GPU pass: issue 7's record run with clean-first eviction, then strict LRU for A/B.
source "$(dirname "$0")/gpu_common.sh"
KEYS="decode_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|h2d_gbps|d2h_bytes|h2d_busy|wait_s|overhead_s|peak_vram|pinned"
step "one GPU, 15 GiB cap: --compare --routing iid (clean_window 3)" | tee "$OUT/bench_compare_iid.txt"
$PY -m mixtral_nb.bench --compare --routing iid --repeat 3 --new-tokens 64 --json "$OUT/compare_iid.json" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/bench_compare_iid.txt" | grep -E "$KEYS"
step "strict LRU: --clean-window 1" | tee "$OUT/bench_lru.txt"
$PY -m mixtral_nb.bench --routing iid --repeat 2 --new-tokens 64 --clean-window 1 2>&1 | grep -v -i warn \
  | tee -a "$OUT/bench_lru.txt" | grep -E "$KEYS"
