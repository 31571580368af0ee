#!/usr/bin/env bash
# One GPU pass for the Decoder work: kernel tests, Decoder equivalence, then the two benchmark targets.
source "$(dirname "$0")/gpu_common.sh"
{ step kernels
  timeout 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "${KTESTS:-cuda}" 2>&1 | tail -n 5
  step "decoder quantized"
  timeout 100 $PY scripts/gpu_engine_check.py decoder --quantized .gpuassets/tinyq --json $OUT/decoder_q.json 2>&1 | grep -v -i warn | tail -n 3
  [ -n "${FP16CHECK:-}" ] && timeout 100 $PY scripts/gpu_engine_check.py decoder --json $OUT/decoder_fp16.json 2>&1 | grep -v -i warn | tail -n 3
} 2>&1 | tee "$OUT/checks.txt"
step "bench --resident" | tee "$OUT/bench_resident.txt"
timeout 150 $PY -m mixtral_nb.bench --resident --repeat 2 ${PROFILE:+--profile $OUT/profile_resident.txt} 2>&1 | grep -v -i warn | tee -a "$OUT/bench_resident.txt"
step "bench --compare --routing iid" | tee "$OUT/bench_compare_iid.txt"
timeout 200 $PY -m mixtral_nb.bench --compare --routing iid --repeat 2 --new-tokens 64 2>&1 | grep -v -i warn | tee -a "$OUT/bench_compare_iid.txt"
step summary
grep -h -E "^=== |decode_tok_s|prefill_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|peak_vram|wait_s|overhead_s|host_syncs|h2d_busy" "$OUT"/bench_*.txt
