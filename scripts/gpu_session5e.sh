#!/usr/bin/env bash
# Session 5, last call: the new default (MIXTRAL_NB_GEMV unset = dp4a_shared, unmasked whole tiles):
# CUDA kernel tests and the Decoder check on 1 and 2 GPUs.
source "$(dirname "$0")/gpu_common.sh"
{ step "kernel tests on CUDA"; kernel_tests "cuda" 150
  step "decoder check (quantized, 1 and 2 GPUs)"; decoder_check
} 2>&1 | tee "$OUT/checks.txt"
