"""Memory planning: byte math against the article checkpoint's sizes, presets, check_fits messages, build_model's check."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from mixtral_nb import OffloadConfig, build_model
import mixtral_nb.planner as P
from mixtral_nb.planner import GiB, MemoryPlanError, ModelSizes, check_fits, plan, preset
from mixtral_nb.tiny import tiny_config, write_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_sizes_match_the_measured_article_numbers():
    s = ModelSizes.of()  # Mixtral-8x7B, the article's quant config
    assert abs(s.expert_bytes - 66_404_352) < 1024  # the article checkpoint (hqq 0.1.1): 66,404,352-66,404,364 B
    assert abs(s.attn_bytes / 32 - 22.3e6) < 0.2e6  # ~22.3 MB/layer
    assert abs(s.embed_bytes - 0.52e9) < 0.01e9
    assert s.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_presets_fit_and_choose_sensible_modes():
    plans = {name: preset(name) for name in P.PRESETS}
    for name, p in plans.items():
        m = P.PRESETS[name]
        check_fits(p, m.vram_bytes if p.device == "cuda" else None, m.host_ram_bytes)
        assert p.gpu_bytes <= m.vram_bytes or p.device == "cpu"
        assert p.host_bytes <= m.host_ram_bytes
        cfg = p.offload_config()
        slots = p.layer_slots()
        assert cfg.main_size == sum(slots) and cfg.offload_size == 32 * 8 - sum(slots)
        assert cfg.offload_per_layer == 8 - min(slots) == p.offload_per_layer
        assert "Memory plan" in p.explain()
    colab = plans["colab-t4"]
    assert colab.device == "cuda" and not colab.host_mirror and 3 <= colab.offload_per_layer <= 5  # 12.7 GB RAM: swap
    assert plans["kaggle-2xt4"].offload_per_layer == 0 and "2 GPUs" in plans["kaggle-2xt4"].explain()
    assert plans["12gb"].offload_per_layer >= colab.offload_per_layer
    for big in ("24gb", "a100-40gb", "a100-80gb"):
        assert plans[big].offload_per_layer == 0 and plans[big].prefetch == 0
    assert plans["cpu"].device == "cpu" and plans["cpu"].gpu_bytes == 0


def test_check_fits_names_the_numbers_and_the_fix():
    article = OffloadConfig(main_size=32 * 6, offload_size=64, buffer_size=4, offload_per_layer=2, host_mirror=False)
    with pytest.raises(MemoryPlanError, match=r"needs \d+\.\d GiB of VRAM, 14\.7 GiB free: set offload_per_layer=[345]"):
        check_fits(article, 15095 * 1024**2, int(12.7e9))
    mirror = OffloadConfig(main_size=32 * 4, offload_size=128, buffer_size=4, offload_per_layer=4, host_mirror=True)
    with pytest.raises(MemoryPlanError, match=r"needs \d+\.\d GiB of host RAM .* 11\.8 GiB available: set host_mirror=False"):
        check_fits(mirror, 15095 * 1024**2, int(12.7e9))
    check_fits(OffloadConfig(32 * 4, 128, 4, 4, host_mirror=False), 15095 * 1024**2, int(12.7e9))
    # spare host blobs count too: 60 more on Colab's RAM do not fit, and the message says which knob
    spare = OffloadConfig(32 * 4, 128, 4, 4, host_mirror=False, extra_host_slots=60)
    with pytest.raises(MemoryPlanError, match=r"lower extra_host_slots \(now 60\)"):
        check_fits(spare, 15095 * 1024**2, int(12.7e9))
    with pytest.raises(ValueError, match=r"extra_host_slots must be between 0 and \d+, got -1"):
        OffloadConfig(32 * 4, 128, 4, 4, extra_host_slots=-1)
    assert issubclass(MemoryPlanError, ValueError)
    # CPU: no VRAM check, but the slots then live in RAM
    check_fits(OffloadConfig(32 * 8, 0, 1, 0, host_mirror=False), None, 40 * GiB)
    with pytest.raises(MemoryPlanError, match="of host RAM"):
        check_fits(OffloadConfig(32 * 8, 0, 1, 0, host_mirror=False), None, 8 * GiB)


def test_plan_refuses_machines_that_cannot_run_it():
    with pytest.raises(MemoryPlanError, match=r"even offload_per_layer=7 needs .* of VRAM, 2\.0 GiB available"):
        plan(2 * GiB, 64 * GiB)
    with pytest.raises(MemoryPlanError, match=r"CPU run needs .* of RAM, 8\.0 GiB available"):
        plan(0, 8 * GiB)
    p = plan(15 * GiB, 12 * GiB, disk_bytes=20 * 10**9)
    assert any("free some space" in n for n in p.notes)


def test_detect_reads_the_machine(monkeypatch):
    import psutil

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=40 * GiB, total=64 * GiB))
    p = P.detect()
    assert p.device == "cpu" and p.host_ram_bytes == 40 * GiB
    tiny = tiny_config(layers=2, experts=4, hidden=64, intermediate=128)
    assert P.detect(model=tiny).sizes.num_experts == 4


def test_build_model_checks_memory_before_allocating(tmp_path, monkeypatch):
    import psutil

    src = write_tiny(tmp_path / "m", layers=2, experts=4, hidden=64, intermediate=128)
    cfg = OffloadConfig(main_size=2 * 3, offload_size=2, buffer_size=1, offload_per_layer=1, prefetch=0)
    real = psutil.virtual_memory

    def ram(avail: int):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=avail, total=real().total))

    blob = 3 * 64 * 128 * 4  # fp32 experts on CPU
    ram(blob * 3)  # not even the expert slots fit
    with pytest.raises(MemoryPlanError, match="of host RAM"):
        build_model("cpu", None, cfg, src)
    # enough for swap mode but not for a host mirror + margin: the OffloadConfig default falls back to swap
    ram(P.HOST_MARGIN + 12 * blob + 2 * 1024**3)
    monkeypatch.setattr(P, "HOST_MARGIN", 100 * 1024**3)
    model = build_model("cpu", None, cfg, src)
    assert model.expert_cache.mirror is False
    monkeypatch.setattr(P, "HOST_MARGIN", 0)
    assert build_model("cpu", None, cfg, src).expert_cache.mirror is True


def test_two_gpus_split_layers_and_hold_every_expert():
    """Kaggle's 2 x T4: each GPU takes half the layers, so the whole 2-bit model is resident."""
    one = preset("colab-t4")
    two = preset("kaggle-2xt4")
    assert two.num_gpus == 2 and two.devices() == ["cuda:0", "cuda:1"]
    assert two.offload_per_layer == 0 and one.offload_per_layer > 0
    assert two.gpu_bytes <= two.vram_bytes
    assert "2 GPUs" in two.explain()
    # the same VRAM per GPU with one GPU cannot hold them all
    assert plan(two.vram_bytes, two.host_ram_bytes, num_gpus=1).offload_per_layer > 0
    assert one.devices() == ["cuda:0"] and preset("cpu").devices() == ["cpu"]


def test_colab_plan_fills_vram_and_host_ram_within_colab_limits():
    """The colab-t4 plan is a byte budget: VRAM filled with slots (layers may differ by one), host RAM
    filled with spare blobs up to the 11.0 GB a Colab runtime survives (pinned + the process's peak)."""
    p = preset("colab-t4")
    m = P.PRESETS["colab-t4"]
    s = p.sizes
    slots = p.layer_slots()
    assert max(slots) - min(slots) <= 1 and sum(slots) > 32 * 5  # more than the old fixed 5 per layer
    assert m.vram_bytes - s.expert_bytes - P.VRAM_MARGIN < p.gpu_bytes <= m.vram_bytes - P.VRAM_MARGIN
    assert p.pinned_bytes + P.HOST_PEAK_OVERHEAD <= 11.0e9  # the hard rule
    assert p.pinned_bytes + P.HOST_PEAK_OVERHEAD + s.expert_bytes > 11.0e9  # and nothing left on the table
    cfg = p.offload_config()
    assert cfg.gpu_slots == tuple(slots) and cfg.extra_host_slots == p.extra_host_slots > 0
    assert cfg.clean_window == 8 and not cfg.host_mirror
    # the host buffers the cache will allocate are what the plan counted
    host_blobs = 32 * 8 - sum(slots) + cfg.buffer_size + cfg.extra_host_slots
    assert host_blobs * s.expert_bytes == p.pinned_bytes
    check_fits(cfg, m.vram_bytes, m.host_ram_bytes, s)
    assert "experts (" in p.explain() and "spare host blobs" in p.explain()


def test_miss_rates_give_missing_layers_more_slots():
    even = P.distribute_slots(180, 32, 8)
    assert sum(even) == 180 and max(even) - min(even) <= 1
    rates = [0.1] * 16 + [0.4] * 16
    skew = P.distribute_slots(180, 32, 8, rates)
    assert sum(skew) == 180 and min(skew) >= 1 and max(skew) <= 8
    assert sum(skew[16:]) > sum(skew[:16])
    p = plan(15095 * 1024**2, int(12.7e9), miss_rates=rates)
    assert sum(p.layer_slots()[16:]) > sum(p.layer_slots()[:16])
    with pytest.raises(ValueError, match=r"miss_rates needs 32 values in \[0, 1\]"):
        plan(15095 * 1024**2, int(12.7e9), miss_rates=[0.5] * 3)
    with pytest.raises(ValueError, match="miss_rates must be a sequence"):
        plan(15095 * 1024**2, int(12.7e9), miss_rates="high")


def test_plan_edited_by_hand_or_for_fewer_layers_stays_consistent():
    import dataclasses

    p = preset("colab-t4")
    hand = dataclasses.replace(p, offload_per_layer=4, host_mirror=True)  # what setup_env.memory_plan does
    assert hand.offload_config().gpu_slots is None and hand.offload_config().offload_per_layer == 4
    short = dataclasses.replace(p, sizes=dataclasses.replace(p.sizes, num_layers=4))  # a quick rehearsal
    cfg = short.offload_config()
    assert cfg.slots_per_layer(4, 8) == p.layer_slots()[:4]
    assert cfg.extra_host_slots == p.extra_host_slots * 4 // 32


def test_detect_counts_this_process_context_once(monkeypatch):
    """Measuring free VRAM creates this process's CUDA context; the plan subtracts a context itself, so
    what NVML says this process holds (at most CUDA_CONTEXT) is added back, and nothing when NVML cannot say."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "T4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (14 * GiB, 15 * GiB))
    monkeypatch.setattr(P, "own_context_bytes", lambda i: 300 * 1024**2)
    assert P.machine().vram_bytes == 14 * GiB + 300 * 1024**2
    monkeypatch.setattr(P, "own_context_bytes", lambda i: 5 * GiB)  # never more than a context's worth
    assert P.machine("cuda:0").vram_bytes == 14 * GiB + P.CUDA_CONTEXT
    monkeypatch.setattr(P, "own_context_bytes", lambda i: 0)
    assert P.machine().vram_bytes == 14 * GiB
