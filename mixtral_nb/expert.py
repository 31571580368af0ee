"""What one Mixtral expert is: its blob layout and how it is encoded.

An expert is ``w2(act(w1 x) * w3 x)`` with w1 = gate [I, H], w3 = up [I, H], w2 = down [H, I].
Either every matrix is quantized (``quant.QSpec`` each) or all are floating point in ``dtype``.
This module is a data format only (the kernels read its layout facts); the forward that runs an
expert is ``moe.expert_forward``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .quant import QSpec, dequantize, quantize
from .storage import DTYPES, Layout, dtype_name

NAMES = ("w1", "w3", "w2")


@dataclass(frozen=True)
class ExpertFormat:
    """Shapes and quantization of every expert of a model (they all share one blob layout)."""

    hidden: int
    intermediate: int
    specs: tuple[QSpec, QSpec, QSpec] | None  # w1, w3, w2; None means floating point
    dtype: torch.dtype = torch.float32  # storage dtype of floating-point experts

    @classmethod
    def make(cls, hidden: int, intermediate: int, ffn: dict[str, Any] | None,
             dtype: torch.dtype = torch.float32) -> "ExpertFormat":
        if ffn is None:
            return cls(hidden, intermediate, None, dtype)
        specs = (QSpec.make((intermediate, hidden), ffn), QSpec.make((intermediate, hidden), ffn),
                 QSpec.make((hidden, intermediate), ffn))
        return cls(hidden, intermediate, specs, dtype)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return (self.intermediate, self.hidden), (self.intermediate, self.hidden), (self.hidden, self.intermediate)

    @functools.cached_property
    def layout(self) -> Layout:  # computed once: views() and dense() use it on every CPU miss
        if self.specs is None:
            return Layout.of((n, self.dtype, s) for n, s in zip(NAMES, self.shapes))
        return Layout.concat((n + ".", spec.layout()) for n, spec in zip(NAMES, self.specs))

    @functools.cached_property
    def w2_start(self) -> int:
        """Byte at which w2's tensors begin in a blob (w1 and w3 come first): a copy split there lets
        an expert's w1/w3 products run while its w2 still arrives."""
        return min(s.offset for s in self.layout.segments if s.name.startswith("w2"))

    @functools.cached_property
    def w3_offset(self) -> int:
        """Bytes from each tensor of w1 to the same tensor of w3 in a blob: one number, so a grouped
        kernel launch can run w1 and w3 of an expert together (see ``kernels.qgemv_grouped``)."""
        at = {s.name: s.offset for s in self.layout.segments}
        gaps = {at["w3." + n[3:]] - at[n] for n in at if n.startswith("w1.")}
        if len(gaps) != 1:
            raise ValueError(f"w1 and w3 are not laid out alike in the expert blob: distances {sorted(gaps)}")
        return gaps.pop()

    def encode(self, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
        """Full-precision matrices -> one CPU blob (quantized when the format says so).

        The last result is remembered by content hash: upcycled models repeat one MLP in every
        expert of a layer, and HQQ's solver is the slow part on a CPU.
        """
        mats = (w1, w3, w2)
        if self.specs is None:
            return self.layout.pack({n: m.to(self.dtype).cpu() for n, m in zip(NAMES, mats)})
        key = (self, _digest(mats))
        if _LAST.get("key") == key:
            return _LAST["blob"].clone()
        tensors = {}
        for n, spec, m in zip(NAMES, self.specs, mats):
            for k, v in quantize(m, spec).items():
                tensors[f"{n}.{k}"] = v.cpu()
        blob = self.layout.pack(tensors)
        _LAST.update(key=key, blob=blob)
        return blob.clone()

    def views(self, blob: Tensor) -> tuple[Any, Any, Any]:
        """Per-matrix views into a blob: a Tensor (float) or a dict of stored tensors (quantized)."""
        if self.specs is None:
            v = self.layout.views(blob)
            return v["w1"], v["w3"], v["w2"]
        return tuple(self.layout.views(blob, prefix=n + ".") for n in NAMES)  # type: ignore[return-value]

    def dense(self, blob: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """The three matrices in floating point (reference path and exactness tests)."""
        views = self.views(blob)
        if self.specs is None:
            return tuple(v.to(dtype) for v in views)  # type: ignore[return-value]
        return tuple(dequantize(v, s, dtype) for v, s in zip(views, self.specs))  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "dtype": dtype_name(self.dtype),
                "specs": None if self.specs is None else [s.to_json() for s in self.specs],
                "blob_bytes": self.layout.total_bytes, "layout": self.layout.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ExpertFormat":
        specs = None if d["specs"] is None else tuple(QSpec(**s) for s in d["specs"])
        fmt = cls(d["hidden"], d["intermediate"], specs, DTYPES[d["dtype"]])  # type: ignore[arg-type]
        if fmt.layout.to_json() != d["layout"]:
            raise ValueError("the stored expert blob layout differs from the one this version computes")
        return fmt


_LAST: dict[str, Any] = {}


def _digest(mats: tuple[Tensor, ...]) -> str:
    h = hashlib.sha1()
    for m in mats:
        h.update(str((m.dtype, tuple(m.shape))).encode())
        h.update(m.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

