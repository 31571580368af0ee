"""Page-locked host buffers of exactly the size asked for.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds
every request up to the next power of two: the per-layer host chunk of Colab's plan (3 Mixtral
experts, 199 MB) pins 256 MB, and the whole plan pins about a third more RAM than it uses. On a
12.7 GB Colab that difference decides whether the runtime survives. So the expert cache takes its
host memory from here: one ordinary allocation, registered with the CUDA driver
(``cudaHostRegister``) for exactly its page-rounded size, unregistered when released.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

PAGE = 4096
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context (layers split over GPUs)


def drop_cuda_error() -> None:
    """Consume CUDA's pending "last error" after a failed runtime call made here (register, unregister).

    The runtime keeps it until some call reads it, and PyTorch reads it after its next kernel launch: that
    launch, anywhere later (the next model build in a notebook), would fail with this error instead.
    """
    if not torch.cuda.is_initialized() or torch.cuda.is_current_stream_capturing():
        return  # nothing pending / a launch now would be recorded into the graph being captured
    try:
        torch.empty(1, dtype=torch.uint8, device=torch.cuda.current_device()).zero_()
    except RuntimeError:
        pass


def _unregister(ptr: int, keep: list[Tensor]) -> None:
    if torch.cuda.is_initialized() and int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
        drop_cuda_error()
    keep.clear()


class HostBuffer:
    """``nbytes`` of host memory as one uint8 tensor, page-locked when ``pin`` is true.

    The memory stays page-locked until :meth:`release` (or until this object is collected); views
    taken from :attr:`data` keep the bytes alive after that, but no longer pinned.
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        if nbytes < 0:
            raise ValueError(f"HostBuffer needs a size >= 0, got {nbytes}")
        self.nbytes = int(nbytes)
        # The driver pins whole pages, so the pinned span is page-aligned and page-rounded, and it must lie
        # inside this allocation: a page shared with another allocation would be partly pinned, and a
        # later copy to memory straddling the span's end fails with "invalid argument".
        size = -(-self.nbytes // PAGE) * PAGE
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        self.data = raw[start:start + self.nbytes]
        self.span = (raw.data_ptr() + start, size)  # what is (or would be) page-locked
        self.pinned = False
        self._finalizer: weakref.finalize | None = None
        if pin and self.nbytes:
            ptr = self.data.data_ptr()
            err = torch.cuda.cudart().cudaHostRegister(ptr, size, _PORTABLE)
            if int(err) != 0:
                drop_cuda_error()
                raise RuntimeError(
                    f"could not page-lock {self.nbytes / 1e9:.2f} GB of host memory (CUDA error {int(err)}): "
                    "host RAM is short or locked memory is limited (ulimit -l); use a plan with fewer offloaded experts"
                )
            self.pinned = True
            self._finalizer = weakref.finalize(self, _unregister, ptr, [raw])

    def rows(self, n: int, row_bytes: int) -> list[Tensor]:
        """``n`` consecutive views of ``row_bytes`` each, from the start of the buffer."""
        if n * row_bytes > self.nbytes:
            raise ValueError(f"{n} rows of {row_bytes} bytes do not fit in a {self.nbytes}-byte host buffer")
        return list(self.data[: n * row_bytes].view(n, row_bytes).unbind(0)) if n else []

    def release(self) -> None:
        """Unpin now (the memory itself goes when the last view of it goes)."""
        if self._finalizer is not None:
            self._finalizer()
        self.pinned = False
