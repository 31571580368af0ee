"""CapturedGraph: a function of static tensors recorded once as a CUDA graph, then replayed.

Why: replaying a graph launches all its kernels for the host cost of about one launch, where launching
them one by one from Python costs that per kernel (Triton's launcher is the slowest). Used by the Decoder (a
layer's attention and router, or every layer when experts are resident) and by OffloadedExperts (one
token through a group of experts).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


class GraphPool:
    """A memory pool shared by the graphs of one owner (a Decoder, an ExpertCache) on one device.

    Those graphs replay one after another on one stream and keep their outputs referenced, so their
    temporaries may share memory; the pool lives and dies with its owner (a handle that outlives
    every graph captured into it must not be reused, so there is no global pool).
    """

    def __init__(self) -> None:
        self._handles: dict[torch.device, Any] = {}

    def handle(self, device: torch.device) -> Any:
        if device not in self._handles:
            with torch.cuda.device(device):
                self._handles[device] = torch.cuda.graph_pool_handle()
        return self._handles[device]


class CapturedGraph:
    """``fn(*inputs)`` recorded as a CUDA graph; calling it copies new values into ``inputs`` and replays.

    ``fn`` runs twice eagerly on a side stream first, so Triton compiles and cuBLAS picks its
    workspace outside the capture. Outputs are the tensors ``fn`` returned during capture: they are
    overwritten by the next replay.
    """

    def __init__(self, fn: Callable[..., Any], inputs: list[Tensor], pool: GraphPool) -> None:
        self.inputs = inputs
        dev = inputs[0].device
        with torch.cuda.device(dev):
            # a capture stream of this device: torch.cuda.graph's shared default stream belongs to
            # whichever device first captured, and a graph captured there would replay on that GPU
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*inputs)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the chat UI's ResourceMonitor thread may query events or memory while
            # a capture runs here; "global" would make those calls (and the capture) fail
            with torch.cuda.graph(self.graph, pool=pool.handle(dev), stream=side, capture_error_mode="thread_local"):
                self.out = fn(*inputs)

    def __call__(self, *args: Tensor) -> Any:
        for dst, src in zip(self.inputs, args):
            if dst is not src:
                dst.copy_(src)
        self.graph.replay()
        return self.out
