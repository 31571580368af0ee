#!/usr/bin/env bash
# Session 5, first call: sweep dp4a_tiles (row tiles per program, pipelined loads) on the grouped decode
# launches against dp4a / dp4a_shared; then the CUDA kernel tests if time is left.
source "$(dirname "$0")/gpu_common.sh"
{ step "dp4a_tiles sweep"; timeout 420 $PY scripts/kernel_bench.py bench --tiles 2>&1 | grep -v -i warn
  step "kernel tests on CUDA"; kernel_tests "grouped_cuda or qlinear_cuda" 100
} 2>&1 | tee "$OUT/tiles.txt"
