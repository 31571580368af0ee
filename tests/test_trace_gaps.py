"""scripts/trace_gaps.py on a hand-made chrome trace: each gap between two expert copies cut at the
events that bound it, and the per-kernel table split by whether an expert copy was running."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tg(script):
    return script("trace_gaps")


def _x(cat, name, ts, dur, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}
    if corr is not None:
        e["args"]["correlation"] = corr
    return e


def _trace():
    """Copy A [0, 1000), kernels 1010-1050 and 1060-1100, the routing D2H 1110-1112 (its runtime call
    returns at 1120), the host launches copy B at 1150, which runs [1160, 2160)."""
    return [
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 1000, 1),
        _x("kernel", "attention", 1010, 40),
        _x("kernel", "router", 1060, 40),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 1110, 2, 2),
        _x("cuda_runtime", "cudaMemcpyAsync", 1100, 20, 2),
        _x("cuda_runtime", "cudaMemcpyAsync", 1150, 5, 3),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1160, 1000, 3),
        _x("kernel", "expert", 1200, 100),
    ]


def test_gap_segments(tg):
    out = tg.analyse(_trace())
    assert out["copies"] == 2 and out["gaps"] == 1
    assert out["gap_median_us"] == 160  # 1000 -> 1160
    assert out["gpu_chain_median_us"] == 112  # to the routing copy's end
    assert out["chain_kernels_median_us"] == 80 and out["chain_kernel_count_median_us"] == 2
    assert out["chain_first_kernel_median_us"] == 10 and out["chain_last_kernel_to_ids_median_us"] == 10
    assert out["sync_wake_median_us"] == 8 and out["host_react_median_us"] == 30 and out["launch_median_us"] == 10
    assert out["busy_share"] == pytest.approx(2000 / 2160)


def test_kernel_table(tg):
    rows = {r[0]: r for r in tg.kernel_table(_trace())}
    name, n, med, p90, mx, total_ms, copying, idle = rows["expert"]
    assert (n, med, copying) == (1, 100, 100) and idle != idle  # NaN: it never ran without a copy
    assert rows["attention"][6] != rows["attention"][6] and rows["attention"][7] == 40
    assert list(rows)[0] == "expert"  # longest total first
