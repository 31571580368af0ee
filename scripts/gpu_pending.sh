#!/usr/bin/env bash
# One GPU pass for what landed without a GPU at the end of session 3: correctness first, then A/B
# timings of the two default-off options (split_copies, dp4a_ahead), each with a profile whose copy-engine
# gaps scripts/trace_gaps.py cuts into GPU chain, sync wake-up, host reaction and launch. Run with kind nvidia-h200-x2 so the
# decoder check covers two GPUs; every bench runs on cuda:0 at the T4 budget.
source "$(dirname "$0")/gpu_common.sh"
KEYS="decode_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|d2h_bytes|h2d_busy|wait_s|overhead_s"
{ step "kernel tests on CUDA"; kernel_tests "cuda" 150
  step "decoder check (run_up/run_down, split_copies config, 1 and 2 GPUs)"
  decoder_check
  step "GEMV methods (dp4a, dp4a_ahead, words)"; timeout 200 $PY scripts/kernel_bench.py bench --methods 2>&1 | tail -n 20
} 2>&1 | tee "$OUT/checks.txt"
for variant in "" "--split-copies"; do
  for m in dp4a dp4a_ahead; do
    step "T4 budget, iid, MIXTRAL_NB_GEMV=$m $variant"
    prof="$OUT/prof_${m}${variant//-/_}.txt"
    MIXTRAL_NB_GEMV=$m timeout 110 $PY -m mixtral_nb.bench --routing iid --repeat 2 --new-tokens 64 $variant \
      --profile "$prof" 2>&1 | grep -E "$KEYS"
    $PY scripts/trace_gaps.py "$prof.trace.json" && rm -f "$prof.trace.json"
  done
done 2>&1 | tee "$OUT/ab.txt"
