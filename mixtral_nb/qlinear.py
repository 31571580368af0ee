"""QuantLinear: a drop-in for ``nn.Linear`` (no bias) whose weight is stored quantized.

Used for the attention projections when ``QuantConfig.attn_config`` is set; the stored tensors are
buffers, so ``.to(device)`` and ``state_dict()`` work as for any module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .quant import QSpec, dequantize, quantize


class QuantLinear(nn.Module):
    """``y = x @ W.T`` with W kept in the low-bit format of :mod:`mixtral_nb.quant`."""

    def __init__(self, spec: QSpec, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self._names = spec.layout().names
        for name in self._names:
            self.register_buffer(name, tensors[name])
        self._dense: Tensor | None = None

    @classmethod
    def from_weight(cls, weight: Tensor, params: dict, device: torch.device | str | None = None) -> "QuantLinear":
        """Quantize a float weight [out, in] (on ``device`` if given, e.g. the GPU for speed)."""
        spec = QSpec.make(tuple(weight.shape), params)
        w = weight if device is None else weight.to(device)
        return cls(spec, quantize(w, spec))

    def stored(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in self._names}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.stored(), self.spec, dtype)

    def forward(self, x: Tensor, xq: tuple[Tensor, ...] | None = None) -> Tensor:
        """``x @ W.T``; ``xq`` is x as ``kernels.shared_x`` quantized it for several projections."""
        if x.device.type == "cpu":
            # CPU: dequantizing costs far more than the matmul; keep the float weight (attention is small)
            w = self._dense
            if w is None or w.dtype != x.dtype:
                w = self._dense = self.dequantized(x.dtype)
            return F.linear(x, w)
        return kernels.qlinear(x, self.stored(), self.spec, xq)

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={s.in_features}, out={s.out_features}, nbits={s.nbits}, group={s.group_size}, axis={s.axis}"
