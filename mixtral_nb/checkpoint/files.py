"""safetensors files read with clear errors: a header check without reading data, and lazy mapping."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from .errors import FIX_FILE, CheckpointError

# bytes per element of the dtypes a safetensors header may name
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100_000_000


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked against the file size without reading data.

    Catches truncated downloads and overwritten headers in milliseconds, before any long work.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"shard {path} is missing: download it again (or the whole folder)") from None
    if path.is_dir():
        raise CheckpointError(f"shard {path} is a folder, not a safetensors file: {FIX_FILE}")
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): {FIX_FILE}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > MAX_HEADER:
            raise CheckpointError(f"{path} has a corrupt safetensors header (it claims {n} header bytes in a "
                                  f"{size}-byte file): {FIX_FILE}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON): {FIX_FILE}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: {FIX_FILE}")
    header.pop("__metadata__", None)
    end = 0
    spans = []
    for key, info in header.items():
        try:
            a, b = info["data_offsets"]
            shape = info["shape"]
            ok = (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                  and type(a) is int and type(b) is int and 0 <= a <= b
                  and b - a == math.prod(shape) * ST_ITEMSIZE[info["dtype"]])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path} has a corrupt safetensors header (entry {key!r}): {FIX_FILE}")
        spans.append((a, b))
        end = max(end, b)
    spans.sort()
    if any(prev[1] > nxt[0] for prev, nxt in zip(spans, spans[1:])):
        raise CheckpointError(f"{path} has a corrupt safetensors header (tensors overlap): {FIX_FILE}")
    if 8 + n + end != size:
        raise CheckpointError(f"{path} has {size} bytes but its header describes {8 + n + end}: the file is "
                              f"truncated or corrupt; {FIX_FILE}")
    return header


class SafetensorsFiles:
    """Lazily opened safetensors files of one folder, with clear errors; ``close()`` unmaps them.

    Readers close the files after every layer so pages of finished layers do not stay mapped
    (mapped pages count in the process's resident memory).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._open: dict[str, Any] = {}
        self._headers: dict[str, dict[str, Any]] = {}

    def header(self, name: str) -> dict[str, Any]:
        if name not in self._headers:
            self._headers[name] = read_header(self.folder / name)
        return self._headers[name]

    def get(self, name: str) -> Any:
        if name not in self._open:
            self.header(name)
            try:
                self._open[name] = safe_open(str(self.folder / name), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{self.folder / name} is not a readable safetensors file ({e}): {FIX_FILE}") from None
        return self._open[name]

    def tensor(self, name: str, key: str) -> Tensor:
        f = self.get(name)
        try:
            return f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.folder / name}: cannot read tensor {key} ({e}): {FIX_FILE}") from None

    def slice(self, name: str, key: str) -> Any:
        f = self.get(name)
        try:
            return f.get_slice(key)
        except Exception as e:
            raise CheckpointError(f"{self.folder / name}: cannot read tensor {key} ({e}): {FIX_FILE}") from None

    def close(self) -> None:
        self._open.clear()

    def keep_only(self, names: set[str]) -> None:
        """Unmap every open file but ``names`` (readers going through a folder layer by layer)."""
        for name in [n for n in self._open if n not in names]:
            del self._open[name]
