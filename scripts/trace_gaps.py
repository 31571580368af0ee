"""Where the copy engine idles during offloaded decode, from a torch.profiler chrome trace.

    python -m mixtral_nb.bench --routing iid --new-tokens 16 --profile prof.txt
    python scripts/trace_gaps.py prof.txt.trace.json

Efficiency (tok/s over the transfer-bound limit) is the share of wall time the host-to-GPU copy
engine is busy, so every gap between two expert copies is lost time. Each gap is cut at the events
that bound it: the end of the last copy, the GPU finishing the small device-to-host copy that carries
the next layer's routing (``.tolist()``), the host returning from that sync, the host launching the
next expert copy, and the copy starting on the GPU.
"""

from __future__ import annotations

import json
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
    segs: dict[str, list[float]] = {"gpu_chain": [], "chain_kernels": [], "chain_kernel_count": [], "sync_wake": [],
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    for path in argv:
        print(path)
        for k, v in analyse(_load(path)).items():
            print(f"  {k:24s} {v:12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
