"""Downloading checkpoints from the Hugging Face hub: progress, resume, disk check, clear errors.

``download`` is ``huggingface_hub.snapshot_download`` into a plain folder (resumable: files already
there are kept, partial ones continue), preceded by a free-disk check computed from the repo's file
sizes, and with hub errors translated into messages that say what to do (gated repos, offline mode,
typos). The pure parts (:func:`check_disk`, :func:`explain_error`) are what the tests exercise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from ..units import GB, GiB
from .errors import CheckpointError, HubError, HubUnreachableError, NotEnoughDiskError

__all__ = ["NotEnoughDiskError", "HubError", "HubUnreachableError", "check_disk", "explain_error", "repo_sizes",
           "download"]

DISK_MARGIN = 1 * GiB  # leave this much free: a full disk breaks more than the download


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk(sizes: dict[str, int], local_dir: str | os.PathLike, margin: int = DISK_MARGIN) -> int:
    """Raise :class:`NotEnoughDiskError` unless ``local_dir``'s disk can take the files in ``sizes``.

    A file already in ``local_dir`` with its final size counts as done (so a resumed download asks
    only for what is left). Returns the bytes still to be written.
    """
    folder = Path(local_dir)
    need = 0
    for name, size in sizes.items():
        p = folder / name
        if not (p.is_file() and p.stat().st_size == size):
            need += size
    free = shutil.disk_usage(_existing_parent(folder)).free
    if need + margin > free:
        raise NotEnoughDiskError(
            f"writing to {folder} needs {need / GB:.1f} GB (+{margin / GB:.1f} GB headroom) but only {free / GB:.1f} GB "
            f"is free on that disk: free some space, or choose a folder on a larger disk"
        )
    return need


def explain_error(exc: BaseException, repo_id: str) -> CheckpointError | None:
    """A hub or network exception -> a :class:`HubError` saying what to do (None: not one we know)."""
    from huggingface_hub import errors  # heavy: only hub calls need huggingface_hub

    url = f"https://huggingface.co/{repo_id}"
    if isinstance(exc, errors.GatedRepoError):
        return HubError(
            f"{repo_id}: this repo is gated: accept the licence at {url} and pass token=... or run "
            "huggingface-cli login; the Mixtral tokenizer ships in mistral-common, so the pre-quantized repo "
            "(lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo) needs no token"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"{repo_id}: no such repo on the hub (or it is private): check the name at {url}, or pass "
                        "token=... for a private repo")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"{repo_id}: that revision does not exist: check the branch or commit at {url}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) or (
            offline and isinstance(exc, (OSError, ConnectionError))):
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached (no network?)"
        return HubUnreachableError(f"{repo_id}: cannot download: {why}, and the files are not all in the local folder yet: "
                        "unset HF_HUB_OFFLINE / connect to the internet, or copy a downloaded folder there")
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2",
                                                                                                  "requests", "urllib3"):
        return HubUnreachableError(f"{repo_id}: network error while downloading ({exc}): check the connection and run again; "
                        "finished files are kept and partial ones resume")
    return None


def repo_sizes(repo_id: str, token: str | None = None, allow_patterns: list[str] | str | None = None,
               revision: str | None = None) -> dict[str, int]:
    """File name -> size in bytes for the repo files a download would fetch."""
    from huggingface_hub import HfApi  # heavy: only hub calls need huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi().model_info(repo_id, files_metadata=True, token=token, revision=revision)
    files = filter_repo_objects(info.siblings or [], allow_patterns=allow_patterns, key=lambda s: s.rfilename)
    return {s.rfilename: int(s.size or 0) for s in files}


def download(repo_id: str, local_dir: str | os.PathLike, token: str | None = None,
             allow_patterns: list[str] | str | None = None, revision: str | None = None) -> Path:
    """Download a hub repo into ``local_dir`` (resumable, with progress bars) and return the folder.

    Checks free disk space first (:class:`NotEnoughDiskError` names the GB needed and free). In
    offline mode, a folder that already holds the files is returned as is.
    """
    from huggingface_hub import snapshot_download  # heavy: only hub calls need huggingface_hub

    local = Path(local_dir)
    try:
        sizes = repo_sizes(repo_id, token=token, allow_patterns=allow_patterns, revision=revision)
    except Exception as e:
        err = explain_error(e, repo_id)
        if err is None:
            raise
        if isinstance(err, HubUnreachableError) and _looks_downloaded(local):
            print(f"mixtral_nb: the hub is unreachable; using the files already in {local}")
            return local
        raise err from e
    need = check_disk(sizes, local)
    if need:
        print(f"mixtral_nb: downloading {need / GB:.1f} GB of {repo_id} into {local}")
    try:
        path = snapshot_download(repo_id, local_dir=local, token=token, allow_patterns=allow_patterns,
                                 revision=revision, tqdm_class=tqdm)
    except Exception as e:
        err = explain_error(e, repo_id)
        if err is None:
            raise
        raise err from e
    return Path(path)


def _looks_downloaded(folder: Path) -> bool:
    if not (folder / "config.json").exists():
        return False
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError, TypeError, OSError):
            return False
        return all(isinstance(n, str) and (folder / n).exists() for n in names)
    return (folder / "model.safetensors").exists()
