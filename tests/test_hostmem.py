"""HostBuffer: exact-size host memory for the expert cache (PyTorch's pinned allocator rounds up)."""

from __future__ import annotations

import psutil
import pytest
import torch

from mixtral_nb.hostmem import PAGE, HostBuffer, drop_cuda_error


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



@pytest.mark.parametrize("nbytes", [1, 3007, PAGE - 1, PAGE, PAGE + 1, 5 * PAGE + 123])
def test_the_pinned_span_is_whole_pages_inside_the_allocation(nbytes):
    """The driver pins whole pages: a span reaching past the allocation would half-pin a page that other
    tensors share, and a later copy straddling its end fails with CUDA's "invalid argument"."""
    buf = HostBuffer(nbytes, pin=False)
    start, size = buf.span
    storage = buf.data.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    assert start % PAGE == 0 and size % PAGE == 0 and size >= nbytes
    assert start == buf.data.data_ptr() and lo <= start and start + size <= hi, (lo, start, size, hi)


def _h2d_gbps(src: torch.Tensor, dst: torch.Tensor) -> float:
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    return 3 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e9


@pytest.mark.gpu
def test_pinned_buffer_costs_its_size_and_copies_at_pinned_speed():
    torch.cuda.init()
    HostBuffer(PAGE, pin=True).release()  # the driver's own first-registration bookkeeping stays out of the count
    n = 199 * 10**6  # Colab plan's host chunk of one layer: torch's pinned allocator would take 256 MiB
    rss0 = psutil.Process().memory_info().rss
    buf = HostBuffer(n, pin=True)
    grown = psutil.Process().memory_info().rss - rss0
    assert buf.pinned
    assert n * 0.98 < grown < n * 1.05, grown  # registering touches every page once: exactly its size
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    buf.data.fill_(7)
    ours = _h2d_gbps(buf.data, dev)
    assert int(dev[-1]) == 7
    torch_pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8).fill_(1)
    ref, slow = _h2d_gbps(torch_pinned, dev), _h2d_gbps(pageable, dev)
    assert ours > 0.8 * ref, (ours, ref, slow)  # the driver treats it as page-locked memory
    buf.release()
    assert not buf.pinned


@pytest.mark.gpu
def test_small_pinned_buffers_leave_later_copies_alone():
    """Odd-sized pinned buffers (a tiny model's host chunk) next to ordinary small tensors: copies into
    those tensors from the GPU keep working (they failed when the pinned span reached past the buffer)."""
    keep = []
    for n in (3007, PAGE + 1, 2 * PAGE - 5):
        keep.append(HostBuffer(n, pin=True))
        for _ in range(64):
            keep.append(torch.arange(257, device="cuda").cpu())
    assert all(int(t[-1]) == 256 for t in keep[1:] if isinstance(t, torch.Tensor))
    for b in keep:
        if isinstance(b, HostBuffer):
            b.release()


@pytest.mark.gpu
def test_a_failed_registration_leaves_no_error_behind():
    """Registering pages twice fails (cudaErrorHostMemoryAlreadyRegistered); after drop_cuda_error the next
    kernel launch runs (without it, that launch raises the old error)."""
    torch.cuda.init()
    buf = HostBuffer(2 * PAGE, pin=True)
    err = int(torch.cuda.cudart().cudaHostRegister(buf.data.data_ptr(), 2 * PAGE, 0))
    assert err != 0
    drop_cuda_error()
    assert int(torch.ones(4, device="cuda").sum()) == 4
    buf.release()
