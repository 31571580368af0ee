# Sourced by the GPU-machine scripts: logs under $OUT (./gpu_logs by default), the repo on
# PYTHONPATH, unbuffered Python, a step banner, and the benchmark keys worth printing.
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PY:-python3}
KEYS="decode_tok_s|prefill_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|t4_projected|peak_vram|pinned_host|h2d_gbps|wait_s|overhead_s|host_syncs|h2d_bytes|d2h_bytes|h2d_busy|outputs_finite|devices"
step() { echo; echo "=== $1 ($(date +%T))"; }
