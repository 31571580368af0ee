"""Matrix products with quantized weights: a fused Triton path on GPUs, pure torch everywhere else.

The fallback dequantizes the weight to the activation dtype and calls ``F.linear``; it is the
reference the fused kernels are tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .quant import QSpec, dequantize


def qlinear(x: Tensor, t: dict[str, Tensor], spec: QSpec) -> Tensor:
    """``x @ W.T`` where W is stored quantized in ``t`` (see ``quant`` for the format)."""
    return F.linear(x, dequantize(t, spec, x.dtype))


def available() -> dict[str, Any]:
    """Which fast paths this process can use (reported by the benchmark and the setup notebook)."""
    return {"triton": False, "cuda": torch.cuda.is_available()}
