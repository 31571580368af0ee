# Sourced by the GPU-machine scripts: logs under $OUT (./gpu_logs by default), the repo on
# PYTHONPATH, unbuffered Python, a step banner, and the benchmark keys worth printing.
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PY:-python3}
KEYS="decode_tok_s|prefill_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|t4_projected|peak_vram|pinned_host|h2d_gbps|wait_s|overhead_s|host_syncs|h2d_bytes|d2h_bytes|h2d_busy|outputs_finite|devices"
step() { echo; echo "=== $1 ($(date +%T))"; }
# CUDA kernel tests whose names match $1 (pytest -k), within $2 seconds
kernel_tests() { timeout "${2:-120}" $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "$1" 2>&1 | tail -n 2; }
# the Decoder (and transformers' forward) against the fp32 reference on the quantized test checkpoint, 1 and 2 GPUs
decoder_check() {
  timeout 150 $PY scripts/gpu_engine_check.py decoder --quantized .gpuassets/tinyq --json "$OUT/decoder_q.json" 2>&1 \
    | grep -v -i warn | tail -n 2
}
# issue 7's T4-budget comparison as a record step: banner, full log $OUT/bench_$1.txt, JSON $OUT/$1.json,
# the key lines on screen; $2: timeout in seconds; the rest: more bench arguments (e.g. --repeat 3)
compare_step() {
  local tag=$1 limit=$2; shift 2
  step "one GPU, 15 GiB cap: --compare --routing iid $* ($tag)" | tee "$OUT/bench_$tag.txt"
  timeout "$limit" $PY -m mixtral_nb.bench --compare --routing iid --new-tokens 64 "$@" --json "$OUT/$tag.json" 2>&1 \
    | grep -v -i warn | tee -a "$OUT/bench_$tag.txt" | grep -E "$KEYS"
}
