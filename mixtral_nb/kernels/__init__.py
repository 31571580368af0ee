"""Quantized matrix products and the Decoder's small fused ops: Triton kernels on GPUs, pure torch
everywhere else.

- :mod:`.dispatch`: the public API; which kernel serves a product, from the weight's shape and
  format and what the device can build (``qlinear``, ``qgemv``, ``qgemv_grouped``, ``shared_x``...);
- :mod:`.dp4a`: the one-token dp4a GEMV of 2/4-bit weights and its activation quantizer;
- :mod:`.words`: the fp32 word kernel, the element-wise GEMV and the dequantize kernel;
- :mod:`.fused`: RMSNorm, rotary + KV-cache write, the router's top-k, the experts' weighted sum,
  a streamed step's wait for its experts;
- :mod:`.capability`: the Triton import and the per-device record of kernel families that failed.

``COMPILE_LIST`` is every kernel variant the engine launches, as the sm_75 compile check builds them
(``scripts/kernel_bench.py compile``); ``compile_cases`` gives it with other block sizes.
"""

from __future__ import annotations

from typing import Any

from .capability import CAPABILITIES, HAVE_TRITON, Capabilities, on_device, tl, triton
from .dispatch import (
    GEMV_MAX_T,
    METHODS,
    CompileCase,
    available,
    can_fuse,
    compile_cases,
    dequantize_fused,
    grouped_split,
    plan,
    qgemv,
    qgemv_grouped,
    qlinear,
    qlinear_reference,
    quantize_x,
    shared_x,
    warmup,
)
from .fused import rms_norm, rope_and_cache, route_topk, wait_slots, weighted_sum
from .words import words_per_split

__all__ = [
    "CAPABILITIES", "COMPILE_LIST", "GEMV_MAX_T", "HAVE_TRITON", "METHODS", "Capabilities", "CompileCase", "available",
    "can_fuse", "compile_cases", "dequantize_fused", "grouped_split", "on_device", "plan", "qgemv", "qgemv_grouped",
    "qlinear", "qlinear_reference", "quantize_x", "rms_norm", "rope_and_cache", "route_topk", "shared_x", "tl",
    "triton", "wait_slots", "warmup", "weighted_sum", "words_per_split",
]


def __getattr__(name: str) -> Any:
    """``COMPILE_LIST``, built on first use: only the compile check and the micro-benchmarks need it."""
    if name == "COMPILE_LIST":
        value = globals()["COMPILE_LIST"] = compile_cases()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
