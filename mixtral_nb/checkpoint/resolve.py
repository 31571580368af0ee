"""One resolver from whatever ``state_path`` a user passes to an opened, project-like checkpoint.

``resolve_checkpoint`` accepts a project folder, the article's pre-quantized folder (converted
once, beside it or in the cache), an original HF folder (quantized as it is read, see
:class:`.quantize.QuantizedView`), a hub id (downloaded into the cache first) or an already
opened checkpoint object; ``build_model`` calls it once and then only builds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig
from ..paths import cache_root
from .article import ArticleCheckpoint, ensure_converted
from .errors import CheckpointError
from .hf import HFCheckpoint
from .integrity import hub_check, hub_expected
from . import hub
from .layout import detect_layout
from .project import ProjectCheckpoint, check_quant
from .quantize import QuantizedView, check_hub_family, looks_like_repo_id


def _folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder: pass the folder that holds config.json "
                              f"(here perhaps {folder.parent})")
    hint = (f"download it first: mixtral_nb.checkpoint.download({str(path)!r}, local_dir)"
            if looks_like_repo_id(str(path)) else "download() or quantize() it first")
    raise CheckpointError(f"checkpoint folder {folder} does not exist: {hint}")


def open_checkpoint(path: str | os.PathLike, quant_config: QuantConfig | None = None, progress: bool = True,
                    verify: bool | None = None) -> HFCheckpoint | ProjectCheckpoint:
    """Detect a folder's layout and open it, validated (and, for a project folder, checksummed).

    The article's pre-quantized folder is converted once into a sibling ``<folder>-mixtral_nb``
    (lossless; a message says so) and that is opened. ``quant_config`` is checked against
    pre-quantized files before any conversion starts. ``verify``: see :class:`ProjectCheckpoint`.
    """
    folder = _folder(path)
    kind = detect_layout(folder)
    if kind == "article":
        folder = ensure_converted(folder, quant_config=quant_config, progress=progress)
        kind = "project"
    if kind == "project":
        ck = ProjectCheckpoint(folder, verify=verify)
        check_quant(ck.quant, quant_config, folder)
        return ck
    return HFCheckpoint(folder)


def resolve_checkpoint(state_path: str | os.PathLike | Any, quant_config: QuantConfig | None = None, *,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
                       verify: bool | None = None, token: str | None = None) -> Any:
    """Any ``state_path`` -> an object with ProjectCheckpoint's reading interface (see the module docstring).

    ``device`` and ``dtype`` matter for original folders only: where attention and experts are
    quantized, and the precision of what stays floating point.
    """
    if not isinstance(state_path, (str, os.PathLike)):
        if getattr(state_path, "kind", None) != "project" or not hasattr(state_path, "blob"):
            raise CheckpointError(f"state_path must be a folder, a hub id or an opened checkpoint, not "
                                  f"{type(state_path).__name__}")
        check_quant(state_path.quant, quant_config, Path(str(getattr(state_path, "folder", "the checkpoint"))))
        return state_path
    path = Path(state_path)
    if not path.exists() and looks_like_repo_id(str(state_path)):
        local = cache_root() / "hub" / str(state_path).replace("/", "--")
        check_hub_family(str(state_path), token=token)
        path = hub.download(str(state_path), local, token=token)
    ck = open_checkpoint(path, quant_config=quant_config, progress=progress, verify=verify)
    if isinstance(ck, HFCheckpoint):
        return QuantizedView(ck, quant_config or QuantConfig(None, None), torch.device(device), dtype)
    return ck


@dataclass
class VerifyReport:
    """What :func:`verify` found: each file's state ("ok", "corrupt", or "no digest"), bytes and time."""

    folder: Path
    kind: str
    files: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return all(v != "corrupt" for v in self.files.values())


def verify(path: str | os.PathLike) -> VerifyReport:
    """Hash every file of a project folder against its manifest (ignoring the VERIFIED marker).

    Structure is checked first (a structural error raises :class:`CheckpointError`). Original and
    article folders carry no digests of ours: their files are compared with the hub's digests where
    ``huggingface_hub`` recorded them at download.
    """
    folder = _folder(path)
    kind = detect_layout(folder)
    t0 = time.perf_counter()
    if kind in ("article", "hf"):
        opened = ArticleCheckpoint(folder, device="cpu") if kind == "article" else HFCheckpoint(folder)
        names = ["config.json", *sorted(set(opened.weight_map.values()))]
        expected = hub_expected(folder, names)
        report = VerifyReport(folder, kind)
        report.files = {n: "ok" if good else "corrupt" for n, good in hub_check(folder, expected).items()}
        report.files.update({n: "no digest" for n in names if n not in expected})
        report.bytes = sum((folder / n).stat().st_size for n in expected)
        report.seconds = time.perf_counter() - t0
        what = "the article's files" if kind == "article" else "an original checkpoint"
        report.note = (f"{what}: structure checked; " + ("files compared with the hub's digests recorded by the download"
                       if expected else "no digests recorded (not downloaded with huggingface_hub)"))
        if not report.ok:
            report.note += "; corrupt files: download them again (delete them first)"
        return report
    ck = ProjectCheckpoint(folder, verify=False)
    hashes = ck.manifest.get("hashes")
    if hashes is None:
        return VerifyReport(folder, kind, note="written by an earlier version without checksums: open it once (e.g. "
                                               "build_model) to record them")
    run = ck.check_digests()
    report = VerifyReport(folder, kind, bytes=run.bytes, seconds=run.seconds)
    for name in sorted(hashes):
        report.files[name] = "ok" if run.digests[name] == hashes[name] else "corrupt"
    if not report.ok:
        report.note = ck.corrupt_message([n for n, v in report.files.items() if v == "corrupt"])
    return report
