"""Routing traces (mixtral_nb.trace) and the cache-policy simulator (mixtral_nb.policy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral_nb import OffloadConfig, QuantConfig, article_quant_config, build_model
from mixtral_nb.cache import ExpertCache
from mixtral_nb.engine import make_engine
from mixtral_nb.expert import ExpertFormat
from mixtral_nb.generate import generate
from mixtral_nb.policy import (POLICIES, CacheModel, budget_slots, distribute, format_table, parse_synthetic,
                               policy_main, policy_table, simulate)
from mixtral_nb.trace import Trace, TraceRecorder, record_routing, synthetic_trace

PROMPT = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(3))
MIRROR = CacheModel(mirror=True)


def one_layer(seq: list[int], experts: int) -> Trace:
    """One layer, top-1, one decoded token per step choosing ``seq[t]``."""
    ids = np.array(seq).reshape(-1, 1, 1)
    return Trace(ids, np.ones(len(seq), dtype=int), np.zeros(len(seq), dtype=bool), experts)


# ------------------------------------------------------------------ the simulator on hand-worked sequences


def test_lru_and_belady_by_hand():
    # 2 slots holding experts 0 and 1 (0 least recent); requests 2 0 3 0 2 3
    # LRU:    2 miss (out 0), 0 miss (out 1), 3 miss (out 2), 0 hit, 2 miss (out 3), 3 miss (out 0): 1 hit
    # Belady: 2 miss (out 1, never used again), 0 hit, 3 miss (out 2: next use step 4, after 0's step 3),
    #         0 hit, 2 miss (out 0, never again), 3 hit: 3 hits
    trace = one_layer([2, 0, 3, 0, 2, 3], experts=5)
    lru = simulate(trace, 2, "lru", MIRROR)
    assert (lru.hits, lru.misses, lru.writebacks) == (1, 5, 0)
    opt = simulate(trace, 2, "belady", MIRROR)
    assert (opt.hits, opt.misses) == (3, 3)
    assert opt.hit_rate == pytest.approx(0.5) and opt.decode_hit_rate == pytest.approx(0.5)
    assert opt.h2d_per_token == pytest.approx(0.5) and opt.d2h_per_token == 0


def test_lfu_by_hand():
    # 2 slots [0, 1]; requests 0 0 2 1 0
    # LRU: hit, hit, 2 miss (out 1), 1 miss (out 0), 0 miss (out 2): 2 hits
    # LFU: hit, hit (0 used twice), 2 miss (out 1: used 0 times), 1 miss (out 2: used once, 0 twice), 0 hit: 3 hits
    trace = one_layer([0, 0, 2, 1, 0], experts=4)
    assert simulate(trace, 2, "lru", MIRROR).hits == 2
    assert simulate(trace, 2, "lfu", MIRROR).hits == 3


def test_clean_first_saves_a_write_back_by_hand():
    # swap mode, 2 slots [0, 1], buffer_size 1 and 1 extra host blob: 2 spare blobs, all but HOST_RESERVE = 1
    # start as host copies of residents (as ExpertCache does since per-layer slots): 0 is clean, 1 dirty, 1 blob
    # free. A loaded expert keeps its host copy when the victim is clean (the layer's clean count stays
    # constant), else only while more than 1 blob is free. Requests 0 2 3 0:
    # LRU:       0 hit; 2 (out 1: dirty, written back; 2 gives its blob to it); 3 (out 0: clean, 3 keeps its
    #            copy); 0 (out 2: dirty, written back): 3 misses, 2 write-backs
    # clean LRU: 0 hit; 2 (out 0: clean, 2 stays clean); 3 (out 2: clean); 0 (out 3: clean): 3 misses, none
    model = CacheModel(mirror=False, buffer_size=1, extra_host_slots=1, clean_window=3)
    trace = one_layer([0, 2, 3, 0], experts=4)
    lru, clean = simulate(trace, 2, "lru", model), simulate(trace, 2, "clean_lru", model)
    assert (lru.misses, lru.writebacks) == (3, 2)
    assert (clean.misses, clean.writebacks) == (3, 0)
    assert lru.d2h_per_token == pytest.approx(2 / 4)
    # With 2 extra blobs (buffer_size 1) both residents start clean, so every eviction is clean under either
    # policy. (Before, residents started without host copies and a loaded expert gave its copy up when few
    # blobs were free: requests 2 0 3 then cost LRU 2 write-backs and clean LRU 1.)
    both = CacheModel(mirror=False, buffer_size=1, extra_host_slots=2, clean_window=3)
    for policy in ("lru", "clean_lru"):
        r = simulate(one_layer([2, 0, 3], experts=4), 2, policy, both)
        assert (r.misses, r.writebacks) == (3, 0), policy
    # host mirror: nothing is ever written back, and clean-first is plain LRU
    assert simulate(trace, 2, "clean_lru", MIRROR).writebacks == 0


def test_spare_blobs_spread_over_layers_and_caches_by_hand():
    # 2 layers, top-1, 3 experts; layer 0 has 2 slots [0, 1], layer 1 has 1 slot [0]; buffer_size 1 + 1 extra
    # = 2 spare host blobs, 1 handed out: to layer 1 (fewer slots first), whose expert 0 starts clean.
    # Layer 0 requests 2 0 1, layer 1 requests 1 2 0, LRU:
    # layer 0: every victim is dirty and with 1 free blob the loaded expert gives its copy up: 3 write-backs
    # layer 1: every victim is clean and the loaded expert keeps its copy: none
    ids = np.array([[2, 1], [0, 2], [1, 0]]).reshape(3, 2, 1)
    trace = Trace(ids, np.ones(3, dtype=int), np.zeros(3, dtype=bool), 3)
    one = CacheModel(mirror=False, buffer_size=1, extra_host_slots=1, gpu_slots=(2, 1))
    r = simulate(trace, None, "lru", one)
    assert (r.misses, r.writebacks, r.slots) == (6, 3, [2, 1])
    # split over two caches (two GPUs): each has its own 2 spare blobs, so layer 0's expert 0 starts clean too:
    # 2 (out 0: clean, 2 keeps its copy), 0 (out 1: dirty, written back), 1 (out 2: clean): 1 write-back
    two = CacheModel(mirror=False, buffer_size=1, extra_host_slots=1, gpu_slots=(2, 1), parts=(1, 1))
    assert simulate(trace, None, "lru", two).writebacks == 1


def test_cache_model_refuses_bad_settings():
    with pytest.raises(ValueError, match="CacheModel.gpu_slots\\[1\\]=0"):
        CacheModel(gpu_slots=(2, 0))
    with pytest.raises(ValueError, match="CacheModel.parts=.*covers 3 layers"):
        CacheModel(gpu_slots=(2, 2), parts=(1, 2))
    with pytest.raises(ValueError, match="CacheModel.mirror"):
        CacheModel(mirror="yes")
    trace = one_layer([0, 1], experts=3)
    with pytest.raises(ValueError, match="give slots"):
        simulate(trace, None)
    with pytest.raises(ValueError, match="slots has 2 entries, the trace has 1 layers"):
        simulate(trace, None, cache=CacheModel(gpu_slots=(1, 1)))
    with pytest.raises(ValueError, match="parts"):
        simulate(trace, 1, cache=CacheModel(parts=(1, 1)))
    with pytest.raises(ValueError, match="slots\\[0\\]=4"):
        policy_table(trace, [1, [4]])  # checked before any replay


def test_a_step_may_not_evict_what_it_needs():
    # top-2, 2 slots [0, 1]: the step needing {0, 2} must evict 1 (0 is needed), whatever the policy
    ids = np.array([[[0, 2]], [[1, 0]]])
    trace = Trace(ids, np.array([1, 1]), np.array([False, False]), 3)
    for policy in POLICIES:
        r = simulate(trace, 2, policy, MIRROR)
        assert (r.hits, r.misses) == (2, 2), policy  # step 0: 0 hit, 2 miss (out 1); step 1: 1 miss (out 2), 0 hit


def test_prefill_chunk_wider_than_the_slots():
    # one prefill step needing experts 0..3 with 2 slots: 0 and 1 hit, 2 and 3 load over computed ones
    ids = np.array([[[0, 1]], [[2, 3]], [[0, 2]]])
    trace = Trace(ids, np.array([3]), np.array([True]), 4)
    r = simulate(trace, 2, "lru", MIRROR)
    assert (r.hits, r.misses, r.decode_tokens) == (2, 2, 0)
    assert r.decode_hit_rate is None and r.d2h_per_token is None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(1, 6), repeat=st.floats(0, 1), zipf=st.sampled_from([0.0, 1.0]),
       prefill=st.integers(0, 12), mirror=st.booleans(), extra=st.integers(0, 6))
def test_belady_misses_least(seed, slots, repeat, zipf, prefill, mirror, extra):
    trace = synthetic_trace(num_layers=2, num_experts=6, top_k=2, tokens=40, repeat=repeat, zipf=zipf,
                            prefill=prefill, seed=seed)
    cache = CacheModel(mirror=mirror, buffer_size=1, extra_host_slots=extra)
    best = simulate(trace, slots, "belady", cache).misses
    for policy in POLICIES:
        assert best <= simulate(trace, slots, policy, cache).misses, policy


def test_more_locality_more_hits():
    rates = [simulate(synthetic_trace(num_layers=4, tokens=300, repeat=p, seed=1), 3, "lru", MIRROR).hit_rate
             for p in (0.0, 0.5, 0.9)]
    assert rates == sorted(rates) and rates[2] - rates[0] > 0.3
    every = simulate(synthetic_trace(num_layers=2, tokens=50, seed=1), 8, "lru", MIRROR)
    assert every.misses == 0  # every expert resident


# ------------------------------------------------------------------ the real cache


# (host mirror, policy, clean_window, extra_host_slots, per-layer GPU slots or None: 3 each). The last rows have
# the colab-t4 plan's proportions: layers of 5 or 6 slots of 8 with clean_window = 8 and about one spare host
# blob per layer (all but one handed out as host copies of residents), then more spares than layers.
CASES = [(True, "lru", 1, 0, None), (False, "lru", 1, 0, None), (False, "clean_lru", 3, 3, None),
         (False, "lru", 1, 3, None), (True, "clean_lru", 3, 0, (4, 2, 3, 5)), (False, "clean_lru", 3, 1, (4, 2, 3, 5)),
         (False, "lru", 1, 4, (2, 3, 2, 4)), (False, "clean_lru", 8, 2, (6, 6, 5, 5)),
         (False, "clean_lru", 8, 2, (4, 4, 3, 3)), (False, "clean_lru", 8, 7, (4, 4, 3, 3))]


@pytest.mark.parametrize("mirror,policy,window,extra,slots", CASES)
def test_recorder_sees_the_router_and_the_simulator_is_the_cache(tiny_dir, mirror, policy, window, extra, slots):
    """On the real tiny model: the recorded ids are the router's own top-k, and replaying them gives the
    ExpertCache's own hits, misses and write-back bytes."""
    kw = dict(buffer_size=2, prefetch=0, extra_host_slots=extra, clean_window=window)
    cfg = (OffloadConfig(main_size=4 * 3, offload_size=4 * 5, offload_per_layer=5, **kw) if slots is None
           else OffloadConfig.for_slots(8, slots, **kw))
    model = build_model("cpu", QuantConfig(None, None), cfg, tiny_dir, host_mirror=mirror)
    routed: list[torch.Tensor] = []  # the gates' own top-k, in call order
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out[2].clone()))
             for layer in model.model.layers]
    try:
        with torch.no_grad(), record_routing(model) as rec:
            model.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    assert all(layer.mlp.experts.recorder is None for layer in model.model.layers)  # off again
    trace = rec.trace()
    assert trace.num_steps == 12 and trace.tokens == 8 + 11 and trace.decode_tokens == 11
    assert trace.prefill.tolist() == [True] + [False] * 11
    assert len(routed) == 12 * 4
    want = [torch.stack(routed[s * 4:(s + 1) * 4], 1).numpy() for s in range(12)]
    for (_, got), exp in zip(trace.steps(), want):
        assert np.array_equal(got, exp)

    stats = model.expert_cache.stats()
    per_layer = slots or (3, 3, 3, 3)
    cache = CacheModel(mirror=mirror, buffer_size=2, extra_host_slots=extra, clean_window=window, gpu_slots=per_layer)
    assert CacheModel.of(model) == cache
    r = simulate(trace, None, policy, cache)  # the cache's own slots
    assert r.slots == list(per_layer)
    assert (r.hits, r.misses) == (stats["hits"], stats["misses"])
    assert r.writebacks * model.expert_cache.blob_bytes == stats["bytes_d2h"]
    assert r.misses * model.expert_cache.blob_bytes == stats["bytes_h2d"]
    if not mirror:
        assert r.writebacks > 0


def test_a_split_model_replays_with_each_caches_own_host_blobs(tiny_dir):
    """Layers split over two devices (two CPU caches stand for two GPUs): each cache has its own spare host
    blobs, and CacheModel.of reads both caches' slots and parts."""
    cfg = OffloadConfig.for_slots(8, (4, 2, 3, 5), buffer_size=2, prefetch=0, extra_host_slots=1, clean_window=3)
    model = build_model(["cpu", "cpu"], QuantConfig(None, None), cfg, tiny_dir, host_mirror=False)
    with torch.no_grad(), record_routing(model) as rec:
        model.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    trace = rec.trace()
    stats = model.expert_cache.stats()
    blob = model.expert_cache.caches[0].blob_bytes
    cache = CacheModel.of(model)
    assert cache == CacheModel(mirror=False, buffer_size=2, extra_host_slots=1, clean_window=3,
                               gpu_slots=(4, 2, 3, 5), parts=(2, 2))
    r = simulate(trace, None, "clean_lru", cache)
    assert (r.hits, r.misses, r.writebacks * blob) == (stats["hits"], stats["misses"], stats["bytes_d2h"])
    assert r.writebacks > 0


FMT = ExpertFormat.make(4, 8, None, torch.float32)  # a tiny float expert: the cache logic is size-blind


def drive_cache(cache: ExpertCache, trace: Trace) -> None:
    """Ask the cache for each step's experts as OffloadedExperts.forward does (no prefetch): hits first,
    the step's experts protected; when none can load, the earlier ones are computed and released first."""
    for step in trace.requests():
        for layer, need in enumerate(step):
            order = sorted(need, key=lambda e: not cache.resident(layer, e))
            protect = set(need)
            got = {}
            for e in order:
                b = cache.fetch(layer, e, protect)
                if b is None:
                    break
                got[e] = b
            for e in order:
                if e not in got:
                    assert cache.fetch(layer, e, protect) is not None
                protect.discard(e)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 3), experts=st.integers(3, 8), k=st.integers(1, 2),
       data=st.data(), buffers=st.integers(1, 3), extra=st.integers(0, 8), mirror=st.booleans(),
       prefill=st.integers(0, 10), repeat=st.floats(0, 1), policy=st.sampled_from(["lru", "clean_lru"]))
def test_replay_is_the_cache_for_any_settings(seed, layers, experts, k, data, buffers, extra, mirror, prefill,
                                              repeat, policy):
    """The real ExpertCache (on CPU, tiny blobs) against the replay, over random slots per layer, spare
    host blobs, windows and routing: the same hits, misses and copies each way."""
    slots = data.draw(st.lists(st.integers(1, experts), min_size=layers, max_size=layers), label="slots")
    window = 1 if policy == "lru" else data.draw(st.integers(1, experts), label="clean_window")
    cfg = OffloadConfig.for_slots(experts, slots, buffer_size=buffers, prefetch=0, extra_host_slots=extra,
                                  clean_window=window)
    trace = synthetic_trace(num_layers=layers, num_experts=experts, top_k=k, tokens=30, repeat=repeat,
                            prefill=prefill, seed=seed)
    blob = torch.zeros(FMT.layout.total_bytes, dtype=torch.uint8)
    cache = ExpertCache(FMT, layers, experts, cfg, "cpu", lambda layer, e: blob, host_mirror=mirror)
    drive_cache(cache, trace)
    model = CacheModel(mirror=mirror, buffer_size=buffers, extra_host_slots=extra, clean_window=window,
                       gpu_slots=slots)
    assert CacheModel.of(type("Built", (), {"expert_cache": cache})()) == model
    r = simulate(trace, None, policy, model)
    stats = cache.stats()
    assert (r.hits, r.misses) == (stats["hits"], stats["misses"])
    assert (r.misses * cache.blob_bytes, r.writebacks * cache.blob_bytes) == (stats["bytes_h2d"], stats["bytes_d2h"])


def test_recorder_keeps_whole_steps_only():
    rec = TraceRecorder(num_layers=2, num_experts=4, top_k=1)
    rec.record(0, torch.tensor([[1]]))  # a forward interrupted after layer 0
    rec.record(0, torch.tensor([[2], [3]]))
    rec.record(1, torch.tensor([[0], [1]]))
    rec.record(0, torch.tensor([[3]]))  # unfinished at the end
    t = rec.trace()
    assert rec.dropped == 1 and t.num_steps == 1 and t.prefill.tolist() == [True]
    assert t.ids[:, :, 0].tolist() == [[2, 0], [3, 1]]


def test_record_routing_needs_offloaded_experts(tiny_ref):
    with pytest.raises(ValueError, match="no offloaded experts"):
        with record_routing(tiny_ref):
            pass


# ------------------------------------------------------------------ files, generator, budgets, CLI


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip(tmp_path, suffix):
    t = synthetic_trace(num_layers=3, tokens=10, prefill=4, seed=2)
    path = t.save(tmp_path / f"t{suffix}")
    back = Trace.load(path)
    assert np.array_equal(back.ids, t.ids) and np.array_equal(back.step_tokens, t.step_tokens)
    assert np.array_equal(back.prefill, t.prefill) and back.num_experts == 8 and back.source == t.source
    assert [p.name for p in tmp_path.iterdir()] == [f"t{suffix}"]  # no temporary left


def test_bad_trace_files(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="cannot read it as a routing trace"):
        Trace.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="no such trace file"):
        Trace.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"\.json or \.npz"):
        synthetic_trace(tokens=2).save(tmp_path / "t.pkl")
    with pytest.raises(ValueError, match="num_experts"):
        Trace(np.array([[[5]]]), np.array([1]), np.array([False]), 4)


def test_synthetic_trace():
    t = synthetic_trace(num_layers=2, num_experts=8, top_k=2, tokens=50, repeat=1.0, seed=0)
    assert (t.ids == t.ids[:1]).all()  # always repeats
    for token in synthetic_trace(tokens=100, repeat=0.5, zipf=1.0).ids.reshape(-1, 2):
        assert token[0] != token[1]  # distinct experts per token
    skewed = synthetic_trace(num_layers=1, tokens=2000, repeat=0.0, zipf=2.0, seed=0)
    counts = np.bincount(skewed.ids.reshape(-1), minlength=8)
    assert counts.max() > 3 * np.sort(counts)[len(counts) // 2]
    with pytest.raises(ValueError, match="repeat"):
        synthetic_trace(repeat=1.5)
    assert parse_synthetic("p=0.5,zipf=1,tokens=9") == {"repeat": 0.5, "zipf": 1.0, "tokens": 9}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_synthetic("q=1")


def test_distribute():
    assert distribute(10, 4, 8) == [3, 3, 2, 2]
    # 5 slots beyond one per layer, shared 0 : 2.5 : 2.5, the odd one to the first of the tie
    assert distribute(8, 3, 8, [0.0, 0.5, 0.5]) == [1, 4, 3]
    assert distribute(20, 3, 8, [0.1, 0.8, 0.1]) == [6, 8, 6]  # capped at 8 experts, the rest shared
    with pytest.raises(ValueError, match="between 3"):
        distribute(2, 3, 8)
    t = synthetic_trace(num_layers=4, tokens=100, seed=3)
    assert sum(budget_slots(t, 14, "miss")) == 14


def test_table_and_cli(capsys, tmp_path):
    t = synthetic_trace(num_layers=2, tokens=30, seed=0)
    rows = policy_table(t, [2, 3])
    assert len(rows) == 2 * len(POLICIES) and len(format_table(rows).splitlines()) == 2 + len(rows)
    out = tmp_path / "t.npz"
    assert policy_main(["--synthetic", "p=0.5,layers=2,tokens=30", "--slots", "2,3", "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "belady" in text and "D2H/token" in text and out.exists()
    assert policy_main(["--trace", str(out), "--total", "5", "--distribute", "miss", "--policies", "lru"]) == 0
    assert "5 total" in capsys.readouterr().out
    assert policy_main(["--trace", str(out), "--slots", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --slots 9") and len(err.strip().splitlines()) == 1
    assert policy_main(["--synthetic", "p=0.5", "--policies", "fifo"]) == 2
    assert "choose from" in capsys.readouterr().err
    # one per-layer budget (like OffloadConfig.gpu_slots), alone or beside uniform ones
    assert policy_main(["--trace", str(out), "--gpu-slots", "3,2", "--extra-host-slots", "2"]) == 0
    text = capsys.readouterr().out
    assert "5 total" in text and "6 spare host blobs" in text and len(text.strip().splitlines()) == 3 + len(POLICIES)
    assert policy_main(["--trace", str(out), "--slots", "2", "--gpu-slots", "3,2", "--policies", "lru"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3 + 2
    assert policy_main(["--trace", str(out), "--gpu-slots", "3,2,1"]) == 2
    assert "--gpu-slots has 3 counts, the trace has 2 layers" in capsys.readouterr().err
    assert policy_main(["--trace", str(out), "--gpu-slots", "3,9"]) == 2
    assert capsys.readouterr().err.startswith("error: --gpu-slots 9")
    # per-layer lists and the cache model's own budget in policy_table
    rows = policy_table(t, [[3, 2], None], ["lru"], CacheModel(gpu_slots=(1, 4)))
    assert [row["slots"] for row in rows] == ["5 total", "5 total"] and rows[0] != rows[1]


@pytest.mark.gpu
@pytest.mark.parametrize("quant,slots,extra", [(False, None, 0), (True, None, 0), (True, (6, 6, 5, 5), 2)])
def test_recorder_on_the_gpu_decoder(tiny_dir, quant, slots, extra):
    """The Decoder on CUDA (graphs for attention and routing, experts eager; with quantized experts the
    grouped kernels): the recorded trace, replayed, gives the cache's own counters, across several
    batched device-to-host flushes (last case: per-layer slots and spare host blobs, colab-t4-like)."""
    kw = dict(buffer_size=2, prefetch=0, extra_host_slots=extra, clean_window=8 if slots else 3)
    cfg = (OffloadConfig(main_size=4 * 3, offload_size=4 * 5, offload_per_layer=5, **kw) if slots is None
           else OffloadConfig.for_slots(8, slots, **kw))
    model = build_model("cuda", article_quant_config() if quant else QuantConfig(None, None), cfg, tiny_dir,
                        host_mirror=False)
    engine = make_engine(model)
    assert engine.kind == "decoder"
    # from the cache's first state (the graphs captured on the way hold attention and routing only)
    rec = TraceRecorder(4, 8, 2, flush_every=5)
    with record_routing(model, rec):
        generate(engine, PROMPT.cuda(), 16)
    trace = rec.trace()
    assert trace.num_steps == 16 and trace.decode_tokens == 15
    stats = model.expert_cache.stats(wait=True)
    cache = CacheModel.of(model)
    assert cache.gpu_slots == (slots or (3, 3, 3, 3)) and cache.spare_host_blobs == 2 + extra
    r = simulate(trace, None, "clean_lru", cache)
    assert (r.hits, r.misses) == (stats["hits"], stats["misses"])
    assert r.writebacks * model.expert_cache.blob_bytes == stats["bytes_d2h"]


@pytest.mark.gpu
def test_all_resident_on_the_gpu_warns(tiny_dir):
    cfg = OffloadConfig(main_size=4 * 8, offload_size=0, buffer_size=1, offload_per_layer=0, prefetch=0)
    model = build_model("cuda", QuantConfig(None, None), cfg, tiny_dir)
    with pytest.warns(RuntimeWarning, match="CUDA graphs"), record_routing(model) as rec:
        pass
    assert not rec.visible
