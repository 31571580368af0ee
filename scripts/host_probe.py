"""Probe for the decode step's host reaction and attention kernel (GPU machine, not CI).

    python scripts/host_probe.py

1. Host time of ``ExpertCache.fetch`` on a miss (victim choice, events, stream switch, the copy's
   launch) and of the CUDA calls it is made of, measured with ``time.perf_counter`` (no profiler:
   profilers inflate exactly these costs). A profile showed ~140 us between the routing sync and
   the first expert copy's launch, time in which the copy engine idles.
2. One-token attention (Mixtral: 8 KV heads x 4 query heads, head_dim 128, additive mask) under each
   SDPA backend, graph-timed, at cache lengths 256 / 1024 / 4096.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mixtral_nb.cache import ExpertCache  # noqa: E402
from mixtral_nb.config import OffloadConfig, article_quant_config  # noqa: E402
from mixtral_nb.expert import ExpertFormat  # noqa: E402


def per_call_us(fn, n: int = 2000) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def host_costs() -> None:
    dev = torch.device("cuda")
    s = torch.cuda.Stream()
    ev = torch.cuda.Event()
    ev.record(s)
    a = torch.empty(1024, dtype=torch.uint8, device=dev)
    b = torch.empty(1024, dtype=torch.uint8, pin_memory=True)
    ids = torch.tensor([1, 2], device=dev)

    def ctx():
        with torch.cuda.stream(s):
            pass
    for name, fn in [("current_stream()", lambda: torch.cuda.current_stream()),
                     ("current_stream(dev)", lambda: torch.cuda.current_stream(dev)),
                     ("Event(enable_timing=True)", lambda: torch.cuda.Event(enable_timing=True)),
                     ("event.record(stream)", lambda: ev.record(s)),
                     ("event.record()", lambda: ev.record()),
                     ("stream.wait_event", lambda: s.wait_event(ev)),
                     ("with torch.cuda.stream(s)", ctx),
                     ("copy_ 1 KiB pinned->GPU non_blocking", lambda: a.copy_(b, non_blocking=True)),
                     ("event.query()", lambda: ev.query()),
                     ("tolist() of 2 ids (sync)", lambda: ids.tolist())]:
        print(f"  {name:40s} {per_call_us(fn):7.2f} us")
    torch.cuda.synchronize()

    fmt = ExpertFormat.make(256, 512, article_quant_config().ffn)
    cfg = OffloadConfig(main_size=4 * 4, offload_size=4 * 4, buffer_size=4, offload_per_layer=4, prefetch=0)
    blob = torch.zeros(fmt.layout.total_bytes, dtype=torch.uint8)
    cache = ExpertCache(fmt, 4, 8, cfg, dev, lambda layer, e: blob, host_mirror=False)
    times = []
    for i in range(4000):
        layer = i % 4
        missing = [e for e in range(8) if not cache.resident(layer, e)]
        e = missing[i % len(missing)]
        t0 = time.perf_counter()
        buf = cache.fetch(layer, e, {e})
        times.append(time.perf_counter() - t0)
        cache.use(buf)
        cache.release(buf)
        if i % 64 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    t = sorted(times[500:])
    print(f"  ExpertCache.fetch (miss, swap mode): median {statistics.median(t) * 1e6:.1f} us, "
          f"p90 {t[int(0.9 * len(t))] * 1e6:.1f} us")


def attention_backends() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    nkv, g, hd = 8, 4, 128
    for length in (256, 1024, 4096):
        q = torch.randn(1, nkv, g, hd, dtype=torch.float16, device=dev)
        k = torch.randn(1, nkv, length, hd, dtype=torch.float16, device=dev)
        v = torch.randn_like(k)
        mask = torch.zeros(g, length, dtype=torch.float16, device=dev)
        mask[:, length // 2:] = float("-inf")
        ref = None
        for name, backend in [("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]:
            try:
                def call():
                    if backend is None:
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
                out = call()
                ref = out if ref is None else ref
                err = (out.float() - ref.float()).abs().max().item()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    call()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(20):
                        call()
                graph.replay()
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(10):
                    graph.replay()
                e.record()
                e.synchronize()
                print(f"  L={length:5d} {name:10s} {s.elapsed_time(e) * 1e3 / 200:7.2f} us  max diff {err:.1e}")
            except Exception as ex:  # a backend that does not take this input
                print(f"  L={length:5d} {name:10s} unavailable: {type(ex).__name__}: {str(ex)[:80]}")


def main() -> int:
    print(torch.__version__, torch.cuda.get_device_name())
    print("host costs")
    host_costs()
    print("one-token attention")
    attention_backends()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
