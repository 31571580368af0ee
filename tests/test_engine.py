"""The offloaded engine computes exactly what transformers computes, for every cache setting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mixtral_nb import OffloadConfig, QuantConfig, build_model
from mixtral_nb.cache import ExpertCache
from mixtral_nb.config import article_quant_config
from mixtral_nb.expert import ExpertFormat

PROMPT = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(1))


def offload(slots: int, prefetch: int = 0, experts: int = 8, layers: int = 4, buffer_size: int = 2) -> OffloadConfig:
    return OffloadConfig(main_size=layers * slots, offload_size=layers * (experts - slots), buffer_size=buffer_size,
                         offload_per_layer=experts - slots, prefetch=prefetch)


@pytest.fixture(scope="module")
def ref_out(tiny_ref):
    with torch.no_grad():
        logits = tiny_ref(PROMPT).logits
    tokens = tiny_ref.generate(PROMPT[:, :8], max_new_tokens=32, do_sample=False, min_new_tokens=32)
    return logits, tokens


def assert_same_as_reference(model, ref_out) -> None:
    """Logits within 1e-5 of transformers' on the 64-token prompt, and 32 identical greedy tokens."""
    with torch.no_grad():
        logits = model(PROMPT).logits
    assert (logits - ref_out[0]).abs().max().item() <= 1e-5
    tokens = model.generate(PROMPT[:, :8], max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert torch.equal(tokens, ref_out[1])


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("slots", range(1, 9))
def test_unquantized_equals_transformers(tiny_dir, ref_out, slots, prefetch, mirror):
    model = build_model("cpu", QuantConfig(None, None), offload(slots, prefetch), tiny_dir, host_mirror=mirror)
    assert_same_as_reference(model, ref_out)
    st = model.expert_cache.stats()
    if mirror:
        assert st["bytes_d2h"] == 0
    elif slots < 8:
        assert st["bytes_d2h"] > 0
    if slots == 8:
        assert st["misses"] == 0 and st["bytes_h2d"] == 0
    if prefetch and slots < 8:
        assert st["prefetch_issued"] > 0


def test_hits_plus_misses_equal_expert_uses(tiny_dir):
    model = build_model("cpu", QuantConfig(None, None), offload(3, prefetch=1), tiny_dir)
    uses = []

    def count(module, args, output):
        uses.append(len(set(output[2].reshape(-1).tolist())))

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(count)
    model.generate(PROMPT[:, :8], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    st = model.expert_cache.stats()
    assert st["hits"] + st["misses"] == sum(uses)
    assert st["host_syncs"] == len(uses)  # one host sync per MoE layer per step


def test_quantized_equals_transformers_with_dequantized_weights(tiny_dir, tmp_path):
    from transformers import MixtralForCausalLM

    model = build_model("cpu", article_quant_config(), offload(3, prefetch=2), tiny_dir)
    cache = model.expert_cache
    # the reference: transformers' own model loaded from the dequantized weights
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if "self_attn" not in k}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}.self_attn.{proj}.weight"] = getattr(layer.self_attn, proj).dequantized()
        tensors[f"{p}.block_sparse_moe.gate.weight"] = tensors.pop(f"{p}.mlp.gate.weight")
        for e in range(cache.E):
            h = cache.host_of[i][e]
            w1, w3, w2 = cache.fmt.dense(cache.host[h])
            for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
                tensors[f"{p}.block_sparse_moe.experts.{e}.{name}.weight"] = w
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    ref = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = model(PROMPT).logits, ref(PROMPT).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
    # and quantization really happened: the weights differ from the originals
    orig = MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        c = orig(PROMPT).logits
    assert (a - c).abs().max().item() > 1e-3


def _blob_cache(experts: int = 4, slots: int = 2, mirror: bool = True, extra: int = 0, layers: int = 1,
                window: int = 1) -> ExpertCache:
    fmt = ExpertFormat.make(8, 16, None, torch.float32)
    blobs = {(layer, e): fmt.encode(torch.full((16, 8), float(e + 100 * layer)), torch.zeros(16, 8),
                                    torch.zeros(8, 16)) for e in range(experts) for layer in range(layers)}
    cfg = OffloadConfig(main_size=slots * layers, offload_size=(experts - slots) * layers, buffer_size=1,
                        offload_per_layer=experts - slots, prefetch=0, extra_host_slots=extra, clean_window=window)
    return ExpertCache(fmt, layers, experts, cfg, "cpu", lambda layer, e: blobs[(layer, e)], host_mirror=mirror)


@pytest.mark.parametrize("mirror", [True, False])
def test_lru_eviction_order(mirror):
    cache = _blob_cache(mirror=mirror)
    assert list(cache.lru[0]) == [0, 1]  # the first experts start on the GPU
    cache.fetch(0, 0)  # hit: 0 becomes most recent
    cache.fetch(0, 2)  # miss: evicts 1, the least recently used
    assert list(cache.lru[0]) == [0, 2]
    cache.fetch(0, 3, protect={0})  # 0 is protected, so 2 goes even though 0 is older
    assert list(cache.lru[0]) == [0, 3]
    assert cache.fetch(0, 1, protect={0, 3}) is None  # nothing evictable: the caller must compute first
    st = cache.stats()
    assert (st["hits"], st["misses"]) == (1, 2)
    # the blob in each slot is the expert the LRU says it is
    for e, buf in cache.lru[0].items():
        assert cache.gpu_views[buf][0][0, 0].item() == float(e)
    assert st["bytes_d2h"] == (0 if mirror else 2 * cache.blob_bytes)


@pytest.mark.parametrize("window", [1, 2])
def test_clean_first_eviction(window):
    """Swap mode with a spare host blob: a resident starts with its host copy (clean), and eviction
    prefers a clean expert within ``clean_window`` of the LRU end (no write-back; the loaded expert then
    keeps its own host copy); window 1 is strict LRU."""
    cache = _blob_cache(mirror=False, extra=1, window=window)
    assert cache.host_of[0][0] is not None and cache.host_of[0][1] is None  # 0 clean, 1 dirty
    cache.fetch(0, 0)  # hit: LRU order is now [1, 0]
    cache.fetch(0, 2)
    if window == 1:  # strict LRU: 1 goes, written back; no blob to spare, so 2 gives its host copy up
        assert list(cache.lru[0]) == [0, 2] and cache.host_of[0][2] is None
        assert cache.stats()["bytes_d2h"] == cache.blob_bytes
    else:  # 0 is clean: it goes with no write-back, and 2 stays clean, so the layer still has one clean
        assert list(cache.lru[0]) == [1, 2] and cache.host_of[0][2] is not None
        assert cache.stats()["bytes_d2h"] == 0
    for e, buf in cache.lru[0].items():
        assert cache.gpu_views[buf][0][0, 0].item() == float(e)
    for e in range(4):  # every expert is on the GPU or on the host, with its own values
        if e not in cache.lru[0]:
            assert cache.host[cache.host_of[0][e]][:4].view(torch.float32)[0].item() == float(e)


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_swap_mode_round_trips_experts(extra, window):
    """Random fetches over 3 layers: every slot always holds the expert the LRU names, and spare host
    blobs (extra_host_slots) only remove write-backs."""
    cache = _blob_cache(experts=6, slots=2, mirror=False, extra=extra, layers=3, window=window)
    gen = torch.Generator().manual_seed(extra)
    for _ in range(300):
        layer, e = (int(v) for v in torch.randint(0, 6, (2,), generator=gen))
        layer %= 3
        buf = cache.fetch(layer, e, prefetch=bool(torch.rand(1, generator=gen) < 0.2))
        assert cache.gpu_views[buf][0][0, 0].item() == float(e + 100 * layer)
        for lay in range(3):
            for ex, b in cache.lru[lay].items():
                assert cache.gpu_views[b][0][0, 0].item() == float(ex + 100 * lay)
            for ex in range(6):  # an expert off the GPU has its blob on the host
                if ex not in cache.lru[lay]:
                    h = cache.host_of[lay][ex]
                    assert h is not None and cache.host[h][:4].view(torch.float32)[0].item() == float(ex + 100 * lay)
    writes = cache.stats()["bytes_d2h"] / cache.blob_bytes
    misses = cache.stats()["misses"] + cache.stats()["prefetch_issued"]
    if extra == 0:  # the article's swap: every miss evicts, every eviction writes back
        assert writes == misses
    else:
        assert writes < misses


def test_real_mixtral_byte_counts():
    """A 2-bit g16 expert of the real Mixtral is <= 66.5 MB (~3.02 bits/param); 4-bit attention ~4.25."""
    q = article_quant_config()
    fmt = ExpertFormat.make(4096, 14336, q.ffn)
    params = 3 * 4096 * 14336
    assert fmt.layout.total_bytes <= 66_500_000
    assert 3.0 < fmt.layout.raw_bytes * 8 / params < 3.05
    from mixtral_nb.quant import QSpec, nbytes

    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)]
    attn = sum(nbytes(QSpec.make(s, q.attn)) for s in shapes)
    bits = attn * 8 / sum(a * b for a, b in shapes)
    assert 4.2 < bits < 4.3
    assert 21e6 < attn < 23e6  # ~22.3 MB per layer: 4-bit g64 q,k,v,o with 8-bit scale and zero meta


def test_article_code_runs_with_only_the_import_changed(tiny_dir):
    """The article's snippet (README), verbatim but for the import line (and a CPU device here)."""
    from hqq.core.quantize import BaseQuantizeConfig
    from mixtral_nb import OffloadConfig, QuantConfig, build_model  # noqa: F811 (the changed import line)

    state_path = tiny_dir
    device = torch.device("cpu")
    offload_config = OffloadConfig(main_size=32 * (8 - 4), offload_size=32 * 4, buffer_size=4, offload_per_layer=4)
    attn_config = BaseQuantizeConfig(nbits=4, group_size=64, quant_zero=True, quant_scale=True)
    attn_config["scale_quant_params"]["group_size"] = 256
    ffn_config = BaseQuantizeConfig(nbits=2, group_size=16, quant_zero=True, quant_scale=True)
    model = build_model(device=device, quant_config=QuantConfig(ffn_config=ffn_config, attn_config=attn_config),
                        offload_config=offload_config, state_path=state_path)
    from transformers import TextStreamer

    class Tok:  # the tiny model has no tokenizer; the streamer only needs decode()
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    out = model.generate(PROMPT[:, :8], max_new_tokens=8, do_sample=False, streamer=TextStreamer(Tok()))
    assert out.shape == (1, 16)
    assert json.loads((tiny_dir / "config.json").read_text())["num_local_experts"] == 8


def test_split_layers_is_contiguous_and_balanced():
    from mixtral_nb.build import split_layers

    assert split_layers(32, 2) == [0] * 16 + [1] * 16
    assert split_layers(5, 2) == [0, 0, 0, 1, 1]
    assert split_layers(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_layers_split_over_two_devices_equal_one(tiny_dir, ref_out, prefetch):
    """Two 'devices' (both CPU here; two GPUs on Kaggle) give the same logits and tokens as one."""
    from mixtral_nb.cache import CacheGroup

    model = build_model(["cpu", "cpu"], QuantConfig(None, None), offload(3, prefetch), tiny_dir)
    assert isinstance(model.expert_cache, CacheGroup)
    assert [c.L for c in model.expert_cache.caches] == [2, 2]
    assert [m.mlp.experts.cache_layer for m in model.model.layers] == [0, 1, 0, 1]
    assert_same_as_reference(model, ref_out)
    st = model.expert_cache.stats()
    assert st["misses"] > 0 and (st["prefetch_issued"] > 0) == (prefetch > 0)
    if prefetch:  # prefetches land in the second device's cache too
        assert model.expert_cache.caches[1].prefetch_issued > 0


def test_swaps_move_whole_experts():
    """Every resident buffer holds its expert's exact bytes, through loads, evictions and write-backs
    (swap mode, one spare host blob)."""
    q = article_quant_config()
    fmt = ExpertFormat.make(32, 64, q.ffn)
    gen = torch.Generator().manual_seed(0)
    blobs = {(layer, e): torch.randint(0, 256, (fmt.layout.total_bytes,), dtype=torch.uint8, generator=gen)
             for layer in range(2) for e in range(6)}
    cfg = OffloadConfig(main_size=4, offload_size=8, buffer_size=1, offload_per_layer=4, prefetch=0,
                        extra_host_slots=1)
    cache = ExpertCache(fmt, 2, 6, cfg, "cpu", lambda layer, e: blobs[(layer, e)].clone(), host_mirror=False)
    for _ in range(60):
        layer, e = (int(v) for v in torch.randint(0, 6, (2,), generator=gen))
        layer %= 2
        buf = cache.fetch(layer, e)
        assert torch.equal(cache.gpu_rows[buf], blobs[(layer, e)])
    for layer in range(2):
        for e, b in cache.lru[layer].items():
            assert torch.equal(cache.gpu_rows[b], blobs[(layer, e)])


def test_cache_stats_are_written_by_the_cache_alone():
    """Counters are read-only outside the cache; callers report uses and syncs through its methods, and
    ``uncounted`` leaves them as they were (the Decoder's graph warm-ups)."""
    fmt = ExpertFormat.make(32, 64, article_quant_config().ffn)
    cfg = OffloadConfig(main_size=2, offload_size=2, buffer_size=1, offload_per_layer=1, prefetch=0)
    cache = ExpertCache(fmt, 2, 2, cfg, "cpu", lambda layer, e: torch.zeros(fmt.layout.total_bytes, dtype=torch.uint8))
    with pytest.raises(AttributeError):
        cache.hits = 5
    cache.fetch(0, 0)
    cache.fetch(0, 1)
    cache.note_uses(3)
    cache.note_host_sync()
    before = cache.counters
    assert (before.hits, before.misses, before.host_syncs) == (4, 1, 1)
    with cache.uncounted():
        cache.fetch(1, 1)
        cache.note_uses(2)
        assert cache.misses == 2 and cache.hits == 6
    assert cache.counters == before and cache.stats()["hits"] == 4
    before.hits = 100  # a copy: the cache's own counters do not change
    assert cache.hits == 4
    cache.copy_on_compute_stream()  # CPU: nothing to switch; copies stay plain
    cache.fetch(1, 0)
    assert cache.misses == 2
