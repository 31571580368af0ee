"""Byte units, defined once: binary (GiB, MiB: memory) and decimal (GB, MB: disk and downloads).

Memory sizes (VRAM, RAM, pinned buffers) are reported in GiB because that is what ``nvidia-smi``
and Colab show; file and download sizes in GB because that is what the hub and ``df -H`` show.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
KB = 10**3
MB = 10**6
GB = 10**9

UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "KB": KB, "MB": MB, "GB": GB}


def fmt_bytes(n: int | float | None, unit: str = "GiB", digits: int = 1) -> str:
    """``n`` bytes as e.g. "14.7 GiB" ("?" for None: an unknown size still prints)."""
    if unit not in UNITS:
        raise ValueError(f"fmt_bytes: unknown unit {unit!r}: use one of {', '.join(UNITS)}")
    if n is None:
        return "?"
    return f"{n / UNITS[unit]:.{digits}f} {unit}"
