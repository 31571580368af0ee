"""What this machine's Triton can build: the Triton import, and a per-device record of kernel
families that failed there.

Why a record and not a switch: a Triton/GPU stack that cannot build one kernel family (the dp4a
kernel's inline PTX, say) must not stop decoding. The first failure on a device is remembered, with
one warning, and that device's calls take the next-best path from then on; other devices, and the
other families, are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

# the kernel families a device may lack, and what takes over when one fails
FAMILIES = {
    "dp4a": "the one-token dp4a GEMV kernel failed; the fp32 word kernel takes its GEMVs",
    "axis0": "the axis-0 GEMV kernel failed; the element-wise kernel takes the article's axis-0 weights",
    "gemv": "the quantized GEMV/dequantize kernels failed; the pure-torch path (dequantize + F.linear) takes over",
    "fused": "a fused Decoder kernel failed; PyTorch ops take RMSNorm, rotary, routing and expert sums",
}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (tests set ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_device(x: Tensor) -> Any:
    """Context that makes x's GPU the current device: Triton launches on the current device (and its
    stream, the one being captured), while layers split over GPUs live on cuda:1 and on. Entering
    ``torch.cuda.device`` costs host time, so it is only entered when the devices differ."""
    if not x.is_cuda or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


class Capabilities:
    """Kernel families (``FAMILIES``) that failed to build or launch, per device.

    ``works`` is asked before every launch (a dict lookup, nothing when no failure was recorded);
    ``fail`` records a failure and warns once for that device and family.
    """

    def __init__(self) -> None:
        self._failed: dict[tuple[str, int | None, str], str] = {}
        self._lock = threading.Lock()

    def works(self, device: torch.device, family: str) -> bool:
        """Whether ``family`` may be tried on ``device`` (no failure recorded there)."""
        return not self._failed or (device.type, device.index, family) not in self._failed

    def fail(self, device: torch.device, family: str, error: BaseException) -> None:
        """Record that ``family`` failed on ``device`` with ``error``; warns the first time."""
        if family not in FAMILIES:
            raise ValueError(f"unknown kernel family {family!r}: use one of {sorted(FAMILIES)}")
        key = (device.type, device.index, family)
        reason = f"{type(error).__name__}: {str(error)[:200]}"
        with self._lock:
            first = key not in self._failed
            self._failed[key] = reason
        if first:
            warnings.warn(f"on {device}, {FAMILIES[family]} ({reason})", RuntimeWarning, stacklevel=3)

    def failures(self) -> dict[str, str]:
        """``"device family" -> error`` of every failure recorded (reports)."""
        return {f"{t}{'' if i is None else f':{i}'} {fam}": r for (t, i, fam), r in self._failed.items()}

    def reset(self) -> None:
        """Forget every failure (tests that break a kernel on purpose)."""
        with self._lock:
            self._failed.clear()


CAPABILITIES = Capabilities()
