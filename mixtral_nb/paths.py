"""Where mixtral_nb keeps what it builds and downloads: the one place that reads ``$MIXTRAL_NB_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MIXTRAL_NB_CACHE`` (``~`` expanded) or ``~/.cache/mixtral_nb``."""
    return Path(os.environ.get("MIXTRAL_NB_CACHE") or "~/.cache/mixtral_nb").expanduser()
