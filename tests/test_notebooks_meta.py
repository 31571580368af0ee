"""The notebooks' structure (no execution: `make test-notebooks` runs them under nbval), and the CPU-safe
parts of the modules they call (setup_env, quality)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = {"00_setup", "01_download", "02_quantize_load", "03_chat", "04_resource_charts", "walkthrough"}
CHECK = "NBVAL_CHECK_OUTPUT"
BADGE = re.compile(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
                   r"\(https://colab\.research\.google\.com/github/[\w.-]+/mixtral_nb/blob/main/notebooks/(?P<name>[\w.-]+)\.ipynb\)")


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def test_all_notebooks_present():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_valid_nbformat(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_first(path):
    first = _read(path).cells[0]
    assert first.cell_type == "markdown"
    m = BADGE.search(first.source)
    assert m, "the first cell must be an Open in Colab badge"
    assert m["name"] == path.stem, "the badge must open this notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_near_top(path):
    cells = _read(path).cells
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"
    i = tagged[0]
    assert cells[i].cell_type == "code" and i <= 6
    assert re.search(r'^MODEL = "auto"', cells[i].source, re.M)
    assert re.search(r"^DEVICE = None", cells[i].source, re.M)
    # papermill-style: plain assignments and comments only
    for line in cells[i].source.splitlines():
        assert not line.strip() or line.lstrip().startswith("#") or re.match(r"^[A-Z_]+ = ", line), line


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_install_cell_is_guarded(path):
    code = [c for c in _read(path).cells if c.cell_type == "code"]
    install = code[0].source
    assert 'if "google.colab" in sys.modules:' in install
    assert "pip" in install and "requirements.txt" in install
    # Colab's torch and ipywidgets stay: they appear only as pinned constraints, never as install targets
    assert "keep.txt" in install and "torch==" in install and "ipywidgets==" in install
    assert not re.search(r'"(torch|ipywidgets)[<>=\w.]*"', install)


# the notebooks this part of the project keeps in step (04_resource_charts has its own install cell)
INSTALL_SHARED = [NB_DIR / f"{n}.ipynb" for n in ("00_setup", "01_download", "02_quantize_load", "03_chat", "walkthrough")]


def test_install_cells_are_the_same():
    cells = {p.stem: next(c for c in _read(p).cells if c.cell_type == "code").source for p in INSTALL_SHARED}
    assert len(set(cells.values())) == 1, "the install cells differ"


def test_install_cell_stops_on_a_failed_git_clone(tmp_path):
    """On Colab, a clone that fails (offline, a typo) must stop Run all with one clear error, not go on
    to pip-install a folder that is not there. Run the cell as Colab would, with a git that fails."""
    import os
    import subprocess
    import sys

    install = next(c for c in _read(INSTALL_SHARED[0]).cells if c.cell_type == "code").source
    assert "/content/mixtral_nb" in install
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "git").write_text("#!/bin/sh\n"
                                  "echo \"fatal: unable to access 'https://github.com/': Could not resolve host\" >&2\n"
                                  "exit 128\n")
    (fake_bin / "git").chmod(0o755)
    runner = ("import sys, types\n"
              "sys.modules['google.colab'] = types.ModuleType('google.colab')  # what Colab's kernel has\n"
              f"exec(compile({install!r}, 'install-cell', 'exec'))\n")
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-c", runner], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: git clone https://github.com/mixtral-nb/mixtral_nb failed"), last
    assert "Could not resolve host" in last and "run this cell again" in last
    assert "pip" not in done.stdout  # stopped before installing anything


def test_the_scripted_question_comes_before_the_widget():
    """The widget shows its session's history when it is made: a question sent from code before it
    appears as its first turn; one sent after it would be hidden (and block the widget while it runs)."""
    for name in ("03_chat", "walkthrough"):
        code = [c.source for c in _read(NB_DIR / f"{name}.ipynb").cells if c.cell_type == "code"]
        send = next(i for i, src in enumerate(code) if "session.send(QUESTION)" in src)
        widget = next(i for i, src in enumerate(code) if "ChatUI(session" in src)
        assert send < widget, name
        assert "session.max_new_tokens = min(48, settings.max_new_tokens)" in code[send], name  # a short scripted reply
        assert not any("session.send(" in src for src in code[widget:]), name


def test_chat_notebooks_offload_on_cpu():
    """On CPU every expert of the embedded model fits, so without offloading the hit rate sits at 100 %:
    the chat notebooks offload half (4 of 8) there unless OFFLOAD_PER_LAYER says otherwise."""
    from mixtral_nb.setup_env import notebook_settings

    settings = notebook_settings("embedded", "cpu")
    for name in ("03_chat", "walkthrough"):
        cells = _read(NB_DIR / f"{name}.ipynb").cells
        params = next(c.source for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        assert re.search(r"^OFFLOAD_PER_LAYER = None ", params, re.M), name
        plan_cell = next(c.source for c in cells if c.cell_type == "code" and "memory_plan(" in c.source)
        scope = {"OFFLOAD_PER_LAYER": None, "PRESET": None, "settings": settings}
        exec(plan_cell.replace("print(plan.explain())", ""), scope)
        assert scope["plan"].offload_per_layer == 4 and scope["plan"].host_mirror, name
        scope = {"OFFLOAD_PER_LAYER": 2, "PRESET": None, "settings": settings}
        exec(plan_cell.replace("print(plan.explain())", ""), scope)
        assert scope["plan"].offload_per_layer == 2, name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_before_every_code_cell(path):
    cells = _read(path).cells
    for i, c in enumerate(cells):
        if c.cell_type == "code":
            assert i > 0 and cells[i - 1].cell_type == "markdown", f"code cell {i} has no markdown cell above it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stripped_with_expected_outputs_beside(path):
    """Committed stripped; each check cell's expected output lives in nbval_expected.json."""
    expected = json.loads((NB_DIR / "nbval_expected.json").read_text())["notebooks"].get(path.name, {})
    checks = 0
    for c in _read(path).cells:
        if c.cell_type != "code":
            continue
        assert not c.outputs and c.execution_count is None, "commit notebooks stripped"
        if CHECK in c.source:
            checks += 1
            outs = expected.get(c.id)
            assert outs, f"check cell {c.id} needs its expected output in notebooks/nbval_expected.json"
            for out in outs:
                assert out["output_type"] == "stream" and out["name"] == "stdout", "expected outputs are plain text"
    assert checks >= 1, "at least one cell whose output proves the stage worked"


def test_check_notebooks_tool_agrees():
    from mixtral_nb.notebook_tools import dirty_notebooks

    assert dirty_notebooks(NB_DIR) == []


def test_dirty_notebooks_flags_any_output(tmp_path):
    from mixtral_nb.notebook_tools import dirty_notebooks

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)")])
    nbformat.write(nb, str(tmp_path / "ok.ipynb"))
    assert dirty_notebooks(tmp_path) == []
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nbformat.write(nb, str(tmp_path / "bad.ipynb"))
    assert dirty_notebooks(tmp_path) == [tmp_path / "bad.ipynb"]


def test_prepare_for_nbval_fills_exactly_the_check_cells(tmp_path):
    from mixtral_nb.notebook_tools import CHECK_MARKER, prepare_for_nbval

    out = prepare_for_nbval(NB_DIR, tmp_path / "nbval")
    assert sorted(p.name for p in out) == sorted(p.name for p in NOTEBOOKS)
    for p in out:
        for c in nbformat.read(str(p), as_version=4).cells:
            if c.cell_type == "code":
                filled = bool(c.outputs) and c.execution_count == 1
                assert filled == (CHECK_MARKER in c.source)
    assert (tmp_path / "nbval" / "quality_embedded.json").exists()  # data files come along


def test_required_stages():
    src = {p.stem: "\n".join(c.source for c in _read(p).cells if c.cell_type == "code") for p in NOTEBOOKS}
    assert "environment_report()" in src["00_setup"] and "fix_triton_libcuda()" in src["00_setup"]
    assert "prepare_model(settings)" in src["01_download"]
    assert "memory_plan(" in src["02_quantize_load"] and "quantize(QUANTIZE_FROM" in src["02_quantize_load"]
    assert "ChatUI(session, monitor).display()" in src["03_chat"] and "session.send(" in src["03_chat"]
    for name in ("04_resource_charts", "walkthrough"):
        assert "plot_timeline(" in src[name] and "ResourceMonitor(" in src[name]
    for stage in ("environment_report()", "prepare_model(", "memory_plan(", "load(", "ChatUI(", "session.send(",
                  "plot_timeline(", "load_results()"):
        assert stage in src["walkthrough"], stage


# ------------------------------------------------------------------------- the modules the notebooks call


def test_environment_report_on_this_machine():
    from mixtral_nb.setup_env import environment_report, format_report

    r = environment_report()
    assert {"python", "colab", "ram_total_gib", "disk_free_gib", "gpus", "versions", "kernels"} <= set(r)
    assert r["versions"]["torch"]
    json.dumps(r)  # plain data
    text = format_report(r)
    assert "RAM" in text and ("GPU" in text)


def test_parse_ldconfig():
    from mixtral_nb.setup_env import _parse_ldconfig

    out = ("1234 libs found in cache `/etc/ld.so.cache'\n"
           "\tlibcudart.so.12 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.12\n"
           "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib64-nvidia/libcuda.so.1\n"
           "\tlibcuda.so (libc6,x86-64) => /usr/lib64-nvidia/libcuda.so\n")
    assert _parse_ldconfig(out) == ["/usr/lib64-nvidia"]


def test_fix_triton_libcuda(monkeypatch, tmp_path):
    import mixtral_nb.setup_env as se

    monkeypatch.setattr(se.torch.cuda, "is_available", lambda: False)
    assert se.fix_triton_libcuda() is None  # no GPU: nothing to do

    # a GPU whose Triton cannot find libcuda (Colab): the folder goes into this process's environment
    (tmp_path / "libcuda.so.1").write_bytes(b"")
    calls = []

    def lookup():
        calls.append(1)
        raise AssertionError("libcuda.so cannot found!")

    lookup.cache_clear = lambda: None
    monkeypatch.setattr(se.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(se, "_triton_lookup", lambda: lookup)
    monkeypatch.setattr(se, "_ldconfig_dirs", lambda: [])
    monkeypatch.setattr(se, "LIBCUDA_CANDIDATES", (str(tmp_path),))
    monkeypatch.delenv("TRITON_LIBCUDA_PATH", raising=False)
    monkeypatch.setenv("LIBRARY_PATH", "/x")
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    assert se.fix_triton_libcuda() == str(tmp_path)
    assert se.os.environ["TRITON_LIBCUDA_PATH"] == str(tmp_path)
    assert se.os.environ["LIBRARY_PATH"].split(":")[:2] == [str(tmp_path), "/x"]

    # Triton finds it by itself: nothing is changed
    monkeypatch.delenv("TRITON_LIBCUDA_PATH")
    monkeypatch.setattr(se, "_triton_lookup", lambda: (lambda: ["/usr/lib/x86_64-linux-gnu"]))
    assert se.fix_triton_libcuda() is None
    assert "TRITON_LIBCUDA_PATH" not in se.os.environ


def test_notebook_settings_on_cpu():
    from mixtral_nb.setup_env import CPU_MAX_NEW_TOKENS, notebook_settings

    s = notebook_settings("auto", "cpu")
    assert s.embedded and s.device.type == "cpu" and s.max_new_tokens == CPU_MAX_NEW_TOKENS
    assert notebook_settings("embedded", "cpu", 5).max_new_tokens == 5


def test_precomputed_quality_table():
    from mixtral_nb.quality import CONFIGS, format_table, load_results, smallest_passing

    doc = load_results(NB_DIR / "quality_embedded.json")
    assert doc["date"] and doc["command"].startswith("python -m mixtral_nb.quality")
    rows = doc["rows"]
    assert [r["name"] for r in rows] == list(CONFIGS)
    by = {r["name"]: r for r in rows}
    fp = by["experts fp16, attn fp16"]
    assert fp["paris"] and fp["perplexity"] > 1
    # fewer bits, fewer bytes
    for attn in ("attn fp16", "attn 4-bit g64"):
        sizes = [by[f"experts {e}, {attn}"]["total_bytes"] for e in ("fp16", "8-bit g64", "4-bit g64", "3-bit g64", "2-bit g16")]
        assert sizes == sorted(sizes, reverse=True)
    best = smallest_passing(rows)
    assert best is not None and best["paris"]
    assert len(format_table(rows).splitlines()) == len(rows) + 2
