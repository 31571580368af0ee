#!/usr/bin/env bash
# Session 5: dp4a / dp4a_shared block shapes (whole-row tiles included) and evict_first on the grouped launches.
source "$(dirname "$0")/gpu_common.sh"
{ step "dp4a shapes sweep"; timeout 500 $PY scripts/kernel_bench.py bench --shapes 2>&1 | grep -v -i warn
} 2>&1 | tee "$OUT/shapes.txt"
