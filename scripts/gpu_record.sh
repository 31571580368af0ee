#!/usr/bin/env bash
# The GPU record run: the checks and measurements CI cannot make, as named steps, each logged under $OUT.
#
#   bash scripts/gpu_record.sh                      # the default steps: env kernels compile decoder bench gemv
#   bash scripts/gpu_record.sh bench resident       # only these steps, in this order
#   OUT=/tmp/logs PY=python3 bash scripts/gpu_record.sh kernels
#
# Steps:
#   assets    on a machine with hqq (the CPU machine): write the quantized tiny checkpoint that `decoder` reads
#   env       torch / Triton / transformers versions and the GPUs
#   kernels   CUDA tests (kernels against the pure-torch reference, pinned host buffers): pytest -m gpu
#   compile   every kernel variant for sm_75 (T4) and sm_90: python scripts/kernel_bench.py compile --arch 75 --arch 90
#   decoder   Decoder and transformers' forward, fp16, against the fp32 model, on 1 and 2 GPUs
#   bench     the T4-budget comparison (ours vs the article's algorithm, one process), then `resident`
#   resident  every expert on the GPU, no VRAM cap
#   colab     what a free Colab runs: the copy microbenchmark (plain vs throttled to a T4's 9.7 GB/s), then
#             the colab-t4 plan (ours vs the article's algorithm in our harness, one process, iid routing) on this GPU capped at a
#             T4's 15,095 MiB counting the CUDA context, measured plain and with the T4's limits emulated
#             (--emulate t4), with the T4 projection, D2H/H2D per token and the time to first token (512 tokens)
#   gemv      one-token GEMV timings against the copy bandwidth: python scripts/kernel_bench.py bench
#   families  other MoE families at the colab-t4 plan: for each of FAMILY_MODELS (qwen3-30b-a3b phi-3.5-moe) the
#             synthetic full-size benchmark (--routing iid --repeat 3 --new-tokens 64 --emulate t4: plain, then with
#             a T4's limits emulated, in one process), JSON in $OUT/family-NAME.json; then `plan --model all --all`
#   rehearse  the Colab rehearsal: bash scripts/gpu_rehearse.sh
#   chat      decode as a chat runs it at the colab-t4 plan (--chat: each token read by the host; with the
#             notebook's monitor and the rehearsal's memory watch running; through ChatSession), iid routing,
#             in our code layout and in the article's (--layout article: axis 0, what the Colab notebook loads)
#   gaps      where the copy engine idles at the colab-t4 plan: a profiled 16-token decode (--profile), then
#             scripts/trace_gaps.py on its trace (the per-layer gap behind efficiency < 1)
#   article   ours at the colab-t4 plan (plain and --emulate t4) and then the article's own code, unmodified, in its
#             own environment (scripts/article_code_bench.py; prepare .article/ first with scripts/article_env.sh
#             and carry it) at the same VRAM cap with its notebook's offload_per_layer=4 and with 3, on the
#             synthetic folder $SYNTH (default /tmp/synth, written if missing); prints ours / theirs
#
# Settings: OUT (log folder, default gpu_logs), PY (default python3), LAYOUT (the article step's code layout for
# ours: ours, the default, or article, the axis-0 layout the Colab notebook loads), TINYQ (the quantized tiny checkpoint,
# default .gpuassets/tinyq), FAMILY_MODELS (the families step's models), DRY_RUN=1 (the families step prints
# its command lines instead of running them; tests/test_bench.py runs them with --tiny on a CPU). Every step runs even when an earlier one fails; the summary at the end lists
# each step's exit status and the script exits non-zero when any step failed. BENCHMARKS.md records the
# results, with the step's command.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
PY=${PY:-python3}
TINYQ=${TINYQ:-.gpuassets/tinyq}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# the benchmark's summary keys worth showing on screen (the full output is in the step's log)
KEYS="decode_tok_s|prefill_tok_s|\.hit_rate|efficiency|speedup|transfer_limit|t4_projected|peak_vram|pinned_host|h2d_gbps"
KEYS="$KEYS|wait_s|overhead_s|host_syncs|h2d_bytes|d2h_bytes|h2d_busy|outputs_finite|devices"
KEYS="$KEYS|emulated_t4_tok_s|emulated_t4_ttft|emulated_t4_prefill|d2h_per_h2d|ttft_s|vram_cap|cuda_context|gpu_expert_slots\b"
KEYS="$KEYS|extra_host_slots|^copy\.|^# plan|^#   "

step_assets() {
  $PY - "$TINYQ" <<'EOF'
import sys, tempfile
from mixtral_nb.checkpoint import quantize
from mixtral_nb.config import article_quant_config
from mixtral_nb.tiny import write_tiny

with tempfile.TemporaryDirectory() as src:
    print(quantize(write_tiny(src, seed=0), sys.argv[1], article_quant_config(), progress=False))
EOF
}
step_env() {
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__); print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
}
step_kernels() { timeout 400 $PY -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py); }
step_compile() { timeout 400 $PY scripts/kernel_bench.py compile --arch 75 --arch 90 --out /tmp/cubins; }
step_decoder() {
  if [ ! -f "$TINYQ/COMPLETE" ]; then
    echo "no quantized tiny checkpoint at $TINYQ: run 'bash scripts/gpu_record.sh assets' on a machine with hqq first"
    return 2
  fi
  timeout 300 $PY scripts/gpu_engine_check.py decoder --quantized "$TINYQ" --json "$OUT/decoder.json"
}
step_bench() {
  timeout 400 $PY -m mixtral_nb.bench --compare --routing iid --repeat 3 --new-tokens 64 --json "$OUT/compare.json" \
    | tee "$OUT/compare.txt" | grep -E "$KEYS"
  local rc=${PIPESTATUS[0]}
  step_resident || return $?
  return "$rc"
}
step_resident() {
  timeout 200 $PY -m mixtral_nb.bench --resident --repeat 3 --new-tokens 64 --json "$OUT/resident.json" \
    | tee "$OUT/resident.txt" | grep -E "$KEYS"
  return "${PIPESTATUS[0]}"
}
step_colab() {
  timeout 90 $PY -m mixtral_nb.bench --copy-only --json "$OUT/copy.json" | tee "$OUT/copy.txt"
  local rc_copy=${PIPESTATUS[0]}
  timeout 380 $PY -m mixtral_nb.bench --compare --plan colab-t4 --emulate t4 --routing iid --repeat 2 --new-tokens 64 \
    --json "$OUT/colab.json" | tee "$OUT/colab.txt" | grep -E "$KEYS"
  local rc=${PIPESTATUS[0]}
  [ "$rc_copy" -ne 0 ] && return "$rc_copy"
  return "$rc"
}
family_run() {  # family_run NAME CMD...: CMD's output in $OUT/NAME.txt, its key lines on screen (DRY_RUN: print CMD)
  local name=$1
  shift
  if [ -n "${DRY_RUN:-}" ]; then echo "+ $*"; return 0; fi
  timeout 380 "$@" | tee "$OUT/$name.txt" | grep -E "$KEYS"
  return "${PIPESTATUS[0]}"
}
step_families() {
  local rc=0 m
  for m in ${FAMILY_MODELS:-qwen3-30b-a3b phi-3.5-moe}; do
    # one process per model: the plain run, then the same model with a T4's limits emulated
    family_run "family-$m" $PY -m mixtral_nb bench --model "$m" --plan colab-t4 --routing iid --repeat 3 \
      --new-tokens 64 --emulate t4 --json "$OUT/family-$m.json" || rc=1
  done
  if [ -n "${DRY_RUN:-}" ]; then echo "+ $PY -m mixtral_nb plan --model all --all"; return 0; fi
  timeout 120 $PY -m mixtral_nb plan --model all --all | tee "$OUT/families-plan.txt"
  [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
  return "$rc"
}
step_article() {
  if [ ! -f .article/src/build_model.py ] || ! ls .article/whl/*.whl >/dev/null 2>&1; then
    echo "no .article/: run 'bash scripts/article_env.sh' on a machine with internet, then carry .article"
    return 2
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/artsite \
    .article/whl/*.whl || return 2
  timeout 250 $PY -m mixtral_nb.bench --plan colab-t4 --emulate t4 --routing iid --repeat 2 --new-tokens 64 \
    --layout "${LAYOUT:-ours}" --json "$OUT/ours-colab.json" | tee "$OUT/ours-colab.txt" | grep -E "$KEYS"
  local rc=${PIPESTATUS[0]} opl
  for opl in 4 3; do  # in the article's own environment: its transformers 4.36.1 must not meet ours
    PYTHONPATH=/tmp/artsite:.article timeout 290 $PY scripts/article_code_bench.py --folder "${SYNTH:-/tmp/synth}" \
      --write-synthetic --offload-per-layer "$opl" --repeat 2 --new-tokens 64 --json "$OUT/article-opl$opl.json" \
      2>&1 | tee "$OUT/article-opl$opl.txt" | grep -E "^(article\.|# built|article_code_bench)"
    [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
  done
  $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ours = json.loads((out / "ours-colab.json").read_text())["runs"]["ours"]["decode_tok_s"]
for opl in (4, 3):
    theirs = json.loads((out / f"article-opl{opl}.json").read_text()).get("article", {}).get("decode_tok_s")
    if theirs:
        print(f"ours {ours:.2f} tok/s / the article's own code (offload_per_layer={opl}) {theirs:.2f} = {ours / theirs:.2f}x")
EOF
  return "$rc"
}
step_gaps() {  # where the copy engine idles at the colab-t4 plan: a profiled decode, then its gaps cut by cause
  timeout 300 $PY -m mixtral_nb.bench --plan colab-t4 --routing iid --repeat 1 --new-tokens 16 \
    --profile "$OUT/gaps-prof.txt" --json "$OUT/gaps-bench.json" | grep -E "$KEYS" || return 1
  timeout 120 $PY scripts/trace_gaps.py "$OUT/gaps-prof.txt.trace.json" | tee "$OUT/gaps.txt"
  local rc=${PIPESTATUS[0]}
  rm -f "$OUT/gaps-prof.txt.trace.json"  # hundreds of MB: the gaps and the text profile are kept
  return "$rc"
}
step_gemv() { timeout 300 $PY scripts/kernel_bench.py bench; }
step_chat() {  # each layout: ours (what quantize writes) and the article's (what the Colab notebook loads)
  local rc=0 layout
  for layout in ours article; do
    timeout 280 $PY -m mixtral_nb.bench --plan colab-t4 --routing iid --repeat 3 --new-tokens 64 --chat \
      --layout "$layout" --json "$OUT/chat-$layout.json" | tee "$OUT/chat-$layout.txt" | grep -E "$KEYS|chat_"
    [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
  done
  return "$rc"
}
step_rehearse() {
  if [ ! -f scripts/gpu_rehearse.sh ]; then echo "scripts/gpu_rehearse.sh is missing"; return 2; fi
  OUT="$OUT/rehearse" bash scripts/gpu_rehearse.sh
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env kernels compile decoder bench gemv)
for s in "${steps[@]}"; do
  if ! declare -F "step_$s" >/dev/null; then
    echo "unknown step '$s': choose from assets env kernels compile decoder bench resident colab gemv families rehearse article gaps chat" >&2
    exit 2
  fi
done

summary=()
failed=0
{ echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"; } | tee "$OUT/record.txt"
for s in "${steps[@]}"; do
  echo; echo "=== $s ($(date +%T))"
  start=$SECONDS
  "step_$s" 2>&1 | tee "$OUT/$s.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && failed=1
  summary+=("$(printf '%-9s exit %-3s %4ss  log %s' "$s" "$rc" "$((SECONDS - start))" "$OUT/$s.log")")
done
echo; printf '%s\n' "${summary[@]}" | tee -a "$OUT/record.txt"
exit "$failed"
