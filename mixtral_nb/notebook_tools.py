"""Running and checking the project's notebooks (used by `make demo`, `make notebooks`, `make lint`)."""

from __future__ import annotations

import json
from pathlib import Path


def execute_to_html(notebook: Path, out_html: Path, timeout: int = 1200) -> Path:
    """Execute a notebook headless (its no-GPU defaults apply on CPU) and write it as HTML."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    body, _ = HTMLExporter().from_notebook_node(nb)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(body)
    return out_html


CHECK_MARKER = "NBVAL_CHECK_OUTPUT"  # nbval --nbval-lax compares the outputs of these cells only


def dirty_notebooks(folder: Path) -> list[Path]:
    """Notebooks committed with outputs or execution counts where none belong.

    Only cells marked ``# NBVAL_CHECK_OUTPUT`` may keep theirs: those outputs are the expected
    results nbval compares against, and nbval skips (or, with outputs, rejects) a cell whose
    execution_count is null, so they keep a count too. Every other cell must be stripped.
    """
    bad = []
    for p in sorted(Path(folder).glob("*.ipynb")):
        nb = json.loads(p.read_text())
        for cell in nb.get("cells", []):
            if cell.get("cell_type") != "code":
                continue
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            if CHECK_MARKER in source:
                continue
            if cell.get("outputs") or cell.get("execution_count"):
                bad.append(p)
                break
    return bad
