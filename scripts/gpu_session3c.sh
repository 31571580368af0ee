#!/usr/bin/env bash
# Session 3, third GPU pass (2 GPUs): graph-timed GEMVs, decoder precision with both GEMV methods,
# issue 8's two-GPU run against the one-GPU T4 budget, and a profile of the offloaded decode.
source "$(dirname "$0")/gpu_common.sh"
KEYS="decode_tok_s|efficiency|overhead_s|speedup|hit_rate|h2d_busy|wait_s"
step methods; timeout 200 $PY scripts/kernel_bench.py bench --methods --sweep 2>&1 | tee "$OUT/methods.txt" | grep -v "^  sweep" 
grep "^  sweep" "$OUT/methods.txt" | sort -t: -k2 -n | head -n 0
for m in dp4a words; do
  step "decoder check $m"; MIXTRAL_NB_GEMV=$m timeout 100 $PY scripts/gpu_engine_check.py decoder --quantized .gpuassets/tinyq --json "$OUT/decoder_$m.json" 2>&1 | grep -v -i warn | tail -n 1
done
step "two GPUs resident"; timeout 100 $PY -m mixtral_nb.bench --devices cuda:0,cuda:1 --offload-per-layer 0 --routing iid --repeat 2 --new-tokens 64 2>&1 | tee "$OUT/two.txt" | grep -E "$KEYS"
step "one GPU T4 budget, profile"; timeout 150 $PY -m mixtral_nb.bench --routing iid --new-tokens 48 --profile "$OUT/prof_iid.txt" 2>&1 | tee "$OUT/iid.txt" | grep -E "$KEYS"
gzip -c "$OUT/prof_iid.txt.trace.json" > "$OUT/trace_iid.json.gz"; rm -f "$OUT"/*.trace.json
