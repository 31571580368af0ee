"""The checkpoint errors, and JSON reading that turns every bad file into one of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIX_FILE = "delete it and download (or re-create) it again"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, corrupt or not what was asked for."""


class NotEnoughDiskError(CheckpointError):
    """The destination's disk cannot hold what is about to be written."""


class HubError(CheckpointError):
    """A download failed for a reason the user can fix (gated repo, offline, wrong name)."""


class HubUnreachableError(HubError):
    """The hub cannot be reached (offline mode or no network); a finished local folder still works."""


class CorruptFileError(CheckpointError):
    """A file's content differs from the checksum recorded when it was written."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or non-object file is a :class:`CheckpointError`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: is this a Mixtral checkpoint folder?") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a file: {FIX_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download or re-create the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e}): check its permissions, or {FIX_FILE}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: re-download or re-create the checkpoint")
    return data
