"""Where mixtral_nb keeps what it builds and downloads: the one place that reads ``$MIXTRAL_NB_CACHE``.

Built models, converted checkpoints, the Mixtral tokenizer and hub downloads all go under
:func:`cache_root`, so pointing ``MIXTRAL_NB_CACHE`` at a larger disk moves all of them together.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MIXTRAL_NB_CACHE"


def cache_root() -> Path:
    """``$MIXTRAL_NB_CACHE`` (with ``~`` and ``$VARS`` expanded) if set, else ``~/.cache/mixtral_nb``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(os.path.expandvars(os.path.expanduser(env)))
    return Path.home() / ".cache" / "mixtral_nb"
