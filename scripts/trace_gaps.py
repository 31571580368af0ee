"""Where the copy engine idles during offloaded decode, from a torch.profiler chrome trace.

    python -m mixtral_nb.bench --routing iid --new-tokens 16 --profile prof.txt
    python scripts/trace_gaps.py prof.txt.trace.json

Efficiency (tok/s over the transfer-bound limit) is the share of wall time the host-to-GPU copy
engine is busy, so every gap between two expert copies is lost time. Each gap is cut at the events
that bound it (and the GPU's share of it, ``gpu_chain``, into its kernels, the idle time before the
first and after the last, and the routing copy itself):
the end of the last copy, the GPU finishing the small device-to-host copy that carries
the next layer's routing (``.tolist()``), the host returning from that sync, the host launching the
next expert copy, and the copy starting on the GPU.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
import sys


def _load(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def analyse(events: list[dict], min_copy_us: float = 100.0, min_gap_us: float = 10.0) -> dict[str, float]:
    """Median and total of each gap segment, in µs; see the module docstring."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("gpu_memcpy", "kernel")]
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    h2d = sorted((e for e in gpu if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"] and e["dur"] >= min_copy_us),
                 key=lambda e: e["ts"])
    ids = sorted((e for e in gpu if e["cat"] == "gpu_memcpy" and "DtoH" in e["name"] and e["dur"] < min_copy_us),
                 key=lambda e: e["ts"])
    kernels = sorted((e for e in gpu if e["cat"] == "kernel"), key=lambda e: e["ts"])
    segs: dict[str, list[float]] = {"gpu_chain": [], "chain_kernels": [], "chain_kernel_count": [],
                                    "chain_first_kernel": [], "chain_last_kernel_to_ids": [], "ids_copy": [],
                                    "sync_wake": [],
                                    "host_react": [], "launch": [], "gap": []}
    for a, b in zip(h2d, h2d[1:]):
        end, start = a["ts"] + a["dur"], b["ts"]
        if start - end < min_gap_us:
            continue
        rt_b = runtime.get(b["args"].get("correlation"))
        inside = [d for d in ids if end <= d["ts"] + d["dur"] <= start]
        if rt_b is None or not inside:
            continue
        d = inside[-1]
        d_end = d["ts"] + d["dur"]
        rt_d = runtime.get(d["args"].get("correlation"))
        host_back = rt_d["ts"] + rt_d["dur"] if rt_d is not None else d_end
        segs["gpu_chain"].append(d_end - end)
        ks = [k for k in kernels if end <= k["ts"] and k["ts"] + k["dur"] <= d_end]
        segs["chain_kernels"].append(sum(k["dur"] for k in ks))  # the rest of gpu_chain: the GPU idle
        segs["chain_kernel_count"].append(len(ks))
        if ks:  # the GPU's idle time inside the chain: before its first kernel, and from its last one to the ids
            segs["chain_first_kernel"].append(ks[0]["ts"] - end)
            segs["chain_last_kernel_to_ids"].append(d["ts"] - max(k["ts"] + k["dur"] for k in ks))
        segs["ids_copy"].append(d["dur"])
        segs["sync_wake"].append(max(0.0, host_back - d_end))
        segs["host_react"].append(rt_b["ts"] - max(host_back, d_end))
        segs["launch"].append(start - rt_b["ts"])
        segs["gap"].append(start - end)
    span = (h2d[-1]["ts"] + h2d[-1]["dur"] - h2d[0]["ts"]) if h2d else 0.0
    busy = sum(e["dur"] for e in h2d)
    out = {"copies": len(h2d), "gaps": len(segs["gap"]), "span_us": span, "busy_share": busy / span if span else 0.0}
    for k, v in segs.items():
        if v:
            out[f"{k}_median_us"] = statistics.median(v)
            out[f"{k}_total_us"] = sum(v)
    return out


def kernel_table(events: list[dict], min_copy_us: float = 100.0) -> list[tuple]:
    """Per kernel name: (name, count, median, p90, max µs, total ms, median µs while an expert copy runs,
    median µs while none does), longest total first: a kernel much slower during copies than without
    contends with them; one slow in both is slow."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("gpu_memcpy", "kernel")]
    copies = sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu
                    if e["cat"] == "gpu_memcpy" and e["dur"] >= min_copy_us)
    starts = [a for a, _ in copies]

    def during_copy(k: dict) -> bool:
        i = bisect.bisect_right(starts, k["ts"] + k["dur"]) - 1
        return any(b > k["ts"] for _, b in copies[max(0, i - 2): i + 1])

    by: dict[str, list[dict]] = {}
    for k in (e for e in gpu if e["cat"] == "kernel"):
        by.setdefault(k["name"][:48], []).append(k)
    rows = []
    for name, ks in by.items():
        d = sorted(k["dur"] for k in ks)
        busy = [k["dur"] for k in ks if during_copy(k)]
        idle = [k["dur"] for k in ks if not during_copy(k)]
        rows.append((name, len(d), statistics.median(d), d[int(0.9 * (len(d) - 1))], d[-1], sum(d) / 1e3,
                     statistics.median(busy) if busy else math.nan, statistics.median(idle) if idle else math.nan))
    return sorted(rows, key=lambda r: -r[5])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    for path in argv:
        print(path)
        events = _load(path)
        for k, v in analyse(events).items():
            print(f"  {k:24s} {v:12.1f}")
        print(f"  {'kernel':48s} {'n':>5s} {'med µs':>8s} {'p90':>8s} {'max':>9s} {'total ms':>9s} "
              f"{'copying':>8s} {'not':>8s}")
        for name, n, med, p90, mx, tot, busy, idle in kernel_table(events)[:16]:
            print(f"  {name:48s} {n:5d} {med:8.1f} {p90:8.1f} {mx:9.1f} {tot:9.2f} {busy:8.1f} {idle:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
