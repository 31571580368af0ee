"""CapturedGraph: a function of static tensors recorded once as a CUDA graph, then replayed.

Why: replaying a graph launches all its kernels for ~10 us of host time, where launching them one by
one from Python costs ~10-80 us each (Triton's launcher is the slowest). Used by the Decoder (a
layer's attention and router, or every layer when experts are resident) and by OffloadedExperts (one
token through a group of experts).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

_POOLS: dict[torch.device, Any] = {}


def pool_for(device: torch.device) -> Any:
    """One memory pool per device for all graphs: they replay one after another on one stream,
    and each keeps its outputs referenced, so their temporaries may share memory."""
    if device not in _POOLS:
        with torch.cuda.device(device):
            _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


class CapturedGraph:
    """``fn(*inputs)`` recorded as a CUDA graph; calling it copies new values into ``inputs`` and replays.

    ``fn`` runs twice eagerly on a side stream first, so Triton compiles and cuBLAS picks its
    workspace outside the capture. Outputs are the tensors ``fn`` returned during capture: they are
    overwritten by the next replay.
    """

    def __init__(self, fn: Callable[..., Any], inputs: list[Tensor]) -> None:
        self.inputs = inputs
        dev = inputs[0].device
        with torch.cuda.device(dev):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*inputs)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool_for(dev)):
                self.out = fn(*inputs)

    def __call__(self, *args: Tensor) -> Any:
        for dst, src in zip(self.inputs, args):
            if dst is not src:
                dst.copy_(src)
        self.graph.replay()
        return self.out
