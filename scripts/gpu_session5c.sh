#!/usr/bin/env bash
# Session 5: unmasked (EVEN) dp4a tiles: block shapes of dp4a / dp4a_shared / dp4a_ahead on the grouped launches.
source "$(dirname "$0")/gpu_common.sh"
{ step "dp4a shapes sweep (EVEN tiles)"; timeout 300 $PY scripts/kernel_bench.py bench --shapes 2>&1 | grep -v -i warn
} 2>&1 | tee "$OUT/shapes_even.txt"
