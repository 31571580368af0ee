#!/usr/bin/env bash
# Issue 16: the Colab rehearsal at full size on the GPU machine. Writes a full-size synthetic
# Mixtral-8x7B folder in the article's layout to a local disk, then runs `python -m mixtral_nb rehearse`
# (conversion, the colab-t4 plan, load, chat turns, Stop, regenerate, a context overflow, the load run
# again) under Colab's limits: 15,095 MiB of VRAM including the CUDA context, 11 GB of host memory.
#
#   OUT=...        logs and rehearse.json go here (default gpu_logs)
#   SYNTH=/tmp/synth   the synthetic folder (its converted copy goes beside it: ~2 x 19 GB of disk)
#   LAYERS=32      layers to write (fewer: a quicker, less faithful run; the plan stays the 32-layer one)
#   NEW_TOKENS=128 tokens per reply
#   PHASE=all      all: everything in one command (fits 10 minutes if the disk writes >= ~0.5 GB/s);
#                  prepare: only write + convert the folder (a first command);
#                  rehearse: the rehearsal on the prepared folder (a second command, same warm machine)
#   NOTEBOOK=1     also execute notebooks/walkthrough.ipynb in a kernel, driving its chat widget
#                  (needs nbformat, nbclient, jupyter_client, ipykernel, IPython, ipywidgets, matplotlib,
#                  zmq, tornado, traitlets; jupyter_ui_poll optional)
#   SKIP=rebuild   stages to leave out (comma-separated: synthetic, rebuild)
#   LIMIT=590      seconds for the command
#
# Expected at full size (32 layers, H200 machine): writing the synthetic folder 1-2 min (~19 GB),
# converting it 1-2.5 min (reads and writes ~19 GB), building 0.5-1 min, the chat stages 1-2 min
# (CUDA graphs captured on the first turn; the overflow turn prefills ~4,000 tokens), the rebuild
# 0.5-1 min. If one command cannot hold it all, run PHASE=prepare then PHASE=rehearse.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() { echo; echo "=== $1 ($(date +%T))"; }
SYNTH=${SYNTH:-/tmp/synth}; LAYERS=${LAYERS:-32}; NEW_TOKENS=${NEW_TOKENS:-128}; PHASE=${PHASE:-all}
NOTEBOOK=${NOTEBOOK:-0}; SKIP=${SKIP:-}; LIMIT=${LIMIT:-590}
args=(--device cuda:0 --vram-cap-mib 15095 --host-limit-gb 11.0 --new-tokens "$NEW_TOKENS" --json "$OUT/rehearse.json")
[ "$NOTEBOOK" = 1 ] && args+=(--notebook)
[ -n "$SKIP" ] && args+=(--skip "$SKIP")
step "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee "$OUT/machine.txt"
df -h "$(dirname "$SYNTH")" | tail -n 1 | tee -a "$OUT/machine.txt"
case "$PHASE" in
  prepare)
    step "write + convert $SYNTH ($LAYERS layers)"
    timeout "$LIMIT" $PY - "$SYNTH" "$LAYERS" <<'PYEOF' 2>&1 | tee "$OUT/prepare.txt"
import sys, time
from mixtral_nb.checkpoint import ensure_converted
from mixtral_nb.synthetic import write_article_checkpoint
t = time.time()
folder = write_article_checkpoint(sys.argv[1], num_layers=int(sys.argv[2]), progress=True)
print(f"written in {time.time() - t:.0f} s"); t = time.time()
print(ensure_converted(folder, progress=True), f"converted in {time.time() - t:.0f} s")
PYEOF
    ;;
  rehearse)
    step "rehearse on $SYNTH"
    timeout "$LIMIT" $PY -m mixtral_nb rehearse --article "$SYNTH" "${args[@]}" 2>&1 | tee "$OUT/rehearse.txt"
    ;;
  all)
    step "synthetic $SYNTH ($LAYERS layers) + rehearse"
    timeout "$LIMIT" $PY -m mixtral_nb rehearse --synthetic "$SYNTH" --layers "$LAYERS" "${args[@]}" 2>&1 \
      | tee "$OUT/rehearse.txt"
    ;;
  *) echo "PHASE must be all, prepare or rehearse (got $PHASE)"; exit 2 ;;
esac
rc=${PIPESTATUS[0]}
echo "exit status $rc" | tee -a "$OUT/rehearse.txt"
exit "$rc"
