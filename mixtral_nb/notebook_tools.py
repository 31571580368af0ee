"""Running and checking the project's notebooks (used by `make demo`, `make notebooks`, `make lint`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def execute_to_html(notebook: Path, out_html: Path, timeout: int = 1200) -> Path:
    """Execute a notebook headless (its no-GPU defaults apply on CPU) and write it as HTML."""
    import nbformat  # development-only dependencies (requirements-dev.txt)
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    body, _ = HTMLExporter().from_notebook_node(nb)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(body)
    return out_html


CHECK_MARKER = "NBVAL_CHECK_OUTPUT"  # nbval --nbval-lax compares the outputs of these cells only
EXPECTED = "nbval_expected.json"  # their expected outputs, kept beside the (stripped) notebooks


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def dirty_notebooks(folder: Path) -> list[Path]:
    """Notebooks committed with outputs or execution counts (they must be committed stripped)."""
    bad = []
    for p in sorted(Path(folder).glob("*.ipynb")):
        nb = json.loads(p.read_text())
        if any(c.get("cell_type") == "code" and (c.get("outputs") or c.get("execution_count")) for c in nb["cells"]):
            bad.append(p)
    return bad


def prepare_for_nbval(folder: Path, dst: Path) -> list[Path]:
    """Copy the notebooks folder to ``dst`` with the expected outputs of the NBVAL_CHECK_OUTPUT cells
    filled in from ``nbval_expected.json``, ready for ``pytest --nbval-lax``.

    The notebooks stay stripped in git; nbval needs the expected outputs in the file it runs (and an
    execution count, or it skips the comparison). A check cell without an expected output is an error.
    """
    folder, dst = Path(folder), Path(dst)
    expected = json.loads((folder / EXPECTED).read_text())["notebooks"]
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(folder, dst)
    out = []
    for p in sorted(dst.glob("*.ipynb")):
        nb = json.loads(p.read_text())
        mine = expected.get(p.name, {})
        for cell in nb["cells"]:
            if cell.get("cell_type") == "code" and CHECK_MARKER in _source(cell):
                if cell.get("id") not in mine:
                    raise ValueError(f"{p.name}: check cell {cell.get('id')} has no expected output in {EXPECTED}")
                cell["outputs"] = mine[cell["id"]]
                cell["execution_count"] = 1
        p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        out.append(p)
    return out
