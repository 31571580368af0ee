"""One contiguous byte blob per expert, and the layout that names the tensors inside it.

Moving an expert between host and GPU is then a single copy of one uint8 tensor, and a GPU slot is
just a row of one preallocated [slots, blob_bytes] buffer. The tensors of an expert are read as
views into its blob, so nothing is re-packed when a blob arrives.

Blob layout: the segments of ``Layout.segments`` in order, each starting at a multiple of
``ALIGN`` bytes (so any dtype view is aligned and loads can be vectorised), padding bytes zero.
For a quantized expert the segments are w1 (gate), w3 (up) and w2 (down), each with the tensors
listed in ``quant.QSpec.layout`` under the prefixes ``w1.``, ``w3.``, ``w2.``; for a floating-point
expert they are the three weight matrices themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

ALIGN = 64

DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "int32": torch.int32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Segment:
    """One tensor inside a blob."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Layout:
    """Ordered, aligned segments of a blob; the same layout serves every expert of a model."""

    segments: tuple[Segment, ...]

    @classmethod
    def of(cls, items: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> "Layout":
        segs = []
        off = 0
        for name, dtype, shape in items:
            seg = Segment(name, dtype, tuple(int(d) for d in shape), off)
            segs.append(seg)
            off += -(-seg.nbytes // ALIGN) * ALIGN
        return cls(tuple(segs))

    @classmethod
    def concat(cls, parts: Iterable[tuple[str, "Layout"]]) -> "Layout":
        """Join layouts, prefixing each part's names (e.g. ``w1.``)."""
        return cls.of((prefix + s.name, s.dtype, s.shape) for prefix, lay in parts for s in lay.segments)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def total_bytes(self) -> int:
        """Blob size including alignment padding."""
        if not self.segments:
            return 0
        last = self.segments[-1]
        return last.offset + -(-last.nbytes // ALIGN) * ALIGN

    @property
    def raw_bytes(self) -> int:
        """Bytes of tensor data, without padding."""
        return sum(s.nbytes for s in self.segments)

    def views(self, blob: Tensor, prefix: str = "") -> dict[str, Tensor]:
        """Tensors viewing into ``blob`` (1-D uint8 of ``total_bytes``); names without ``prefix``."""
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != self.total_bytes:
            raise ValueError(f"blob must be 1-D uint8 of {self.total_bytes} bytes, got {blob.dtype} {tuple(blob.shape)}")
        out = {}
        for s in self.segments:
            if s.name.startswith(prefix):
                out[s.name[len(prefix):]] = blob[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        return out

    def pack(self, tensors: dict[str, Tensor], out: Tensor | None = None) -> Tensor:
        """Copy named tensors into one blob (allocated on CPU unless ``out`` is given)."""
        missing = set(self.names) - set(tensors)
        extra = set(tensors) - set(self.names)
        if missing or extra:
            raise ValueError(f"blob tensors do not match the layout: missing {sorted(missing)}, unexpected {sorted(extra)}")
        blob = torch.zeros(self.total_bytes, dtype=torch.uint8) if out is None else out
        views = self.views(blob)
        for s in self.segments:
            t = tensors[s.name]
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise ValueError(f"tensor {s.name}: expected {dtype_name(s.dtype)} {s.shape}, "
                                 f"got {dtype_name(t.dtype)} {tuple(t.shape)}")
            views[s.name].copy_(t)
        return blob

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "dtype": dtype_name(s.dtype), "shape": list(s.shape), "offset": s.offset}
                for s in self.segments]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> "Layout":
        lay = cls.of((d["name"], DTYPES[d["dtype"]], tuple(d["shape"])) for d in data)
        for seg, d in zip(lay.segments, data):
            if seg.offset != d["offset"]:
                raise ValueError(f"blob layout entry {d['name']} has offset {d['offset']}, expected {seg.offset}")
        return lay
