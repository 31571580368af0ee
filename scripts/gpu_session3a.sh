#!/usr/bin/env bash
# Session 3, first GPU pass: re-check session 2's unverified commits, probe SM copies of pinned memory,
# and profile where a decode step's GPU time goes (resident and offloaded) and how the GEMV configs compare.
source "$(dirname "$0")/gpu_common.sh"
{ step kernels
  timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 | tail -n 5
  step "decoder quantized"
  timeout 100 $PY scripts/gpu_engine_check.py decoder --quantized .gpuassets/tinyq --json $OUT/decoder_q.json 2>&1 | grep -v -i warn | tail -n 3
  step "chat both engines"
  timeout 100 $PY scripts/gpu_engine_check.py chat --quantized .gpuassets/tinyq 2>&1 | grep -v -i warn | tail -n 6
  step probe
  timeout 90 $PY scripts/gpu_probe.py 2>&1 | tail -n 30
} 2>&1 | tee "$OUT/checks.txt"
step "resident profile" | tee "$OUT/bench_resident.txt"
timeout 150 $PY -m mixtral_nb.bench --resident --new-tokens 32 --profile $OUT/prof_resident.txt 2>&1 | grep -v -i warn | tee -a "$OUT/bench_resident.txt" | grep -E "decode_tok_s|overhead"
step "offloaded profile" | tee "$OUT/bench_iid.txt"
timeout 150 $PY -m mixtral_nb.bench --routing iid --new-tokens 32 --profile $OUT/prof_iid.txt 2>&1 | grep -v -i warn | tee -a "$OUT/bench_iid.txt" | grep -E "decode_tok_s|efficiency|overhead"
gzip -c $OUT/prof_iid.txt.trace.json > $OUT/trace_iid.json.gz; rm -f $OUT/*.trace.json
step "kernel sweep"
timeout 120 $PY scripts/kernel_bench.py bench --sweep --cases "w1/w3 2-bit,w2 2-bit,q/o" 2>&1 | tee "$OUT/kernels.txt" | tail -n 14
