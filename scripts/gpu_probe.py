"""Probe for a sync-free expert swap: can SMs copy experts between pinned host RAM and the GPU fast?

    python scripts/gpu_probe.py [--mb 66] [--device cuda:0]

Times, for one expert-sized blob: the DMA copy engine (``Tensor.copy_``, what the cache uses now),
a Triton kernel reading mapped pinned memory (host -> GPU), one writing it (GPU -> host), and one
swapping a GPU buffer with a host blob in place (both directions at once), over grid sizes.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    step = tl.num_programs(0) * BLOCK
    for off in range(start, n, step):
        offs = off + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def _swap(a, b, n, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    step = tl.num_programs(0) * BLOCK
    for off in range(start, n, step):
        offs = off + tl.arange(0, BLOCK)
        m = offs < n
        va = tl.load(a + offs, mask=m)
        vb = tl.load(b + offs, mask=m)
        tl.store(a + offs, vb, mask=m)
        tl.store(b + offs, va, mask=m)


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / 1e3 / reps


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=66.4)
    p.add_argument("--device", default="cuda:0")
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.cuda.set_device(dev)
    nbytes = int(a.mb * 1e6) // 16 * 16
    n = nbytes // 4
    host = torch.randint(0, 1 << 30, (n,), dtype=torch.int32).pin_memory()
    host2 = torch.randint(0, 1 << 30, (n,), dtype=torch.int32).pin_memory()
    gpu = torch.empty(n, dtype=torch.int32, device=dev)
    gpu2 = torch.randint(0, 1 << 30, (n,), dtype=torch.int32, device=dev)
    gb = nbytes / 1e9
    t = timed(lambda: gpu.copy_(host, non_blocking=True))
    print(f"DMA H2D {a.mb:.1f} MB: {t * 1e6:.0f} us {gb / t:.1f} GB/s")
    t = timed(lambda: host2.copy_(gpu2, non_blocking=True))
    print(f"DMA D2H: {t * 1e6:.0f} us {gb / t:.1f} GB/s")
    s2 = torch.cuda.Stream()

    def both():
        gpu.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(gpu2, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s2)
    t = timed(both)
    print(f"DMA H2D + D2H on two streams: {t * 1e6:.0f} us, {2 * gb / t:.1f} GB/s both ways")
    try:
        _copy[(4,)](host, gpu, n, BLOCK=1024)
        torch.cuda.synchronize()
        ok = torch.equal(gpu.cpu(), host)
        print(f"Triton reads a pinned CPU tensor: {'OK' if ok else 'WRONG DATA'}")
    except Exception as e:  # the probe's question: report the answer either way
        print(f"Triton cannot take a pinned CPU tensor: {type(e).__name__}: {str(e)[:300]}")
        return 1
    for grid in (16, 32, 66, 132, 264, 528):
        for block in (1024, 2048, 4096):
            w = 4 if block <= 1024 else 8
            t = timed(lambda: _copy[(grid,)](host, gpu, n, BLOCK=block, num_warps=w))
            t2 = timed(lambda: _copy[(grid,)](gpu2, host2, n, BLOCK=block, num_warps=w))
            t3 = timed(lambda: _swap[(grid,)](gpu2, host2, n, BLOCK=block, num_warps=w))
            print(f"SM copy grid={grid:3d} block={block}: H2D {gb / t:5.1f} GB/s  D2H {gb / t2:5.1f} GB/s  "
                  f"swap {t3 * 1e6:6.0f} us ({gb / t3:5.1f} GB/s each way)")
    # concurrent with a compute kernel: does a big GEMM slow the SM copy (and vice versa)?
    x = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    tg = timed(lambda: x @ x, reps=3)
    s3 = torch.cuda.Stream()

    def overlap():
        with torch.cuda.stream(s3):
            _swap[(66,)](gpu2, host2, n, BLOCK=2048, num_warps=8)
        x @ x
        torch.cuda.current_stream().wait_stream(s3)
    t = timed(overlap, reps=3)
    print(f"GEMM alone {tg * 1e6:.0f} us; swap (66 programs) beside it: {t * 1e6:.0f} us together")
    return 0


if __name__ == "__main__":
    sys.exit(main())
