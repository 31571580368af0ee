"""HostBuffer: exact-size host memory for the expert cache (PyTorch's pinned allocator rounds up)."""

from __future__ import annotations

import psutil
import pytest
import torch

from mixtral_nb.hostmem import PAGE, HostBuffer


def test_rows_are_disjoint_views_of_one_page_aligned_buffer():
    buf = HostBuffer(3 * 1000 + 7, pin=False)
    assert buf.data.data_ptr() % PAGE == 0 and buf.data.numel() == 3007
    rows = buf.rows(3, 1000)
    for i, r in enumerate(rows):
        r.fill_(i + 1)
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert rows[1].data_ptr() - rows[0].data_ptr() == 1000
    with pytest.raises(ValueError, match="do not fit"):
        buf.rows(4, 1000)
    with pytest.raises(ValueError, match=">= 0"):
        HostBuffer(-1, pin=False)


@pytest.mark.gpu
def test_pinned_buffer_costs_its_size_not_the_next_power_of_two():
    torch.cuda.init()
    n = 199 * 10**6  # Colab plan's host chunk of one layer: torch's pinned allocator would take 256 MiB
    rss0 = psutil.Process().memory_info().rss
    buf = HostBuffer(n, pin=True)
    grown = psutil.Process().memory_info().rss - rss0
    assert buf.pinned and buf.data.is_pinned()
    assert n * 0.98 < grown < n * 1.05, grown
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    buf.data.fill_(7)
    dev.copy_(buf.data, non_blocking=True)
    torch.cuda.synchronize()
    assert int(dev[-1]) == 7
    buf.release()
    assert not buf.data.is_pinned()
