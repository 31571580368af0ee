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


def dirty_notebooks(folder: Path) -> list[Path]:
    """Notebooks that carry outputs or execution counts (they must be committed stripped)."""
    bad = []
    for p in sorted(Path(folder).glob("*.ipynb")):
        nb = json.loads(p.read_text())
        for cell in nb.get("cells", []):
            if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count")):
                bad.append(p)
                break
    return bad
