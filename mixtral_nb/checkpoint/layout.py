"""Which kind of folder a path is, from its file names alone (cheap: no tensor is read)."""

from __future__ import annotations

import json
from pathlib import Path

INDEX = "model.safetensors.index.json"
PROJECT_FILES = ("manifest.json", "COMPLETE", "progress.json")


def is_article_folder(folder: Path) -> bool:
    """An index whose names end in ``.W_q``: hqq-quantized tensors, the article's layout."""
    index = Path(folder) / INDEX
    if not index.is_file():
        return False
    try:
        wm = json.loads(index.read_text()).get("weight_map", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError, RecursionError):
        return False
    return isinstance(wm, dict) and any(isinstance(k, str) and k.endswith(".W_q") for k in wm)


def detect_layout(folder: Path) -> str:
    """"project", "article" (the article's pre-quantized files) or "hf" (original floating point)."""
    folder = Path(folder)
    if any((folder / n).exists() for n in PROJECT_FILES):
        return "project"
    return "article" if is_article_folder(folder) else "hf"
