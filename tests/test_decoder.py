"""The plain-PyTorch Decoder computes what transformers' forward computes, step by step."""

from __future__ import annotations

import pytest
import torch

from mixtral_nb import QuantConfig, build_model
from mixtral_nb.decoder import Decoder, DecoderConfig
from mixtral_nb.generate import generate

from test_engine import PROMPT, offload


@pytest.fixture(scope="module")
def ref_steps(tiny_ref):
    """transformers' logits for every position of the 64-token prompt, and its 24 greedy tokens."""
    with torch.no_grad():
        logits = tiny_ref(PROMPT).logits[0]
    tokens = tiny_ref.generate(PROMPT[:, :8], max_new_tokens=24, do_sample=False, min_new_tokens=24)
    return logits, tokens[:, 8:]


@pytest.mark.parametrize("slots,prefetch,bucket", [(8, 0, 16), (3, 2, 16), (1, 0, 256), (5, 1, 7)])
def test_decoder_matches_transformers(tiny_dir, ref_steps, slots, prefetch, bucket):
    model = build_model("cpu", QuantConfig(None, None), offload(slots, prefetch), tiny_dir)
    dec = Decoder(model, DecoderConfig(max_len=80, bucket=bucket))
    logits, tokens = ref_steps
    # prefill 40 tokens, then one token at a time (prefill and decode paths, several buckets)
    got = [dec.forward(PROMPT[:, :40])]
    for t in range(40, 64):
        got.append(dec.forward(PROMPT[:, t:t + 1]))
    assert dec.pos == dec.length == 64
    want = torch.cat([logits[39:40], logits[40:64]])
    assert (torch.cat(got) - want).abs().max().item() <= 1e-5
    assert torch.equal(generate(dec, PROMPT[:, :8], 24), tokens)


def test_truncate_and_reuse(tiny_dir, ref_steps):
    """Rewinding (chat regenerate) and prefilling on top of an existing sequence."""
    model = build_model("cpu", QuantConfig(None, None), offload(4), tiny_dir)
    dec = Decoder(model, DecoderConfig(max_len=64, bucket=32))
    logits = ref_steps[0]
    dec.forward(PROMPT[:, :20])
    dec.forward(torch.tensor([[7]]))  # a token that is then taken back
    dec.truncate(20)
    out = dec.forward(PROMPT[:, 20:30])  # a multi-token chunk after a cached prefix
    assert (out - logits[29:30]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="truncate"):
        dec.truncate(31)
    assert dec.length == 30


def test_too_long_is_refused_before_work(tiny_dir):
    model = build_model("cpu", QuantConfig(None, None), offload(8), tiny_dir)
    dec = Decoder(model, DecoderConfig(max_len=16))
    dec.forward(PROMPT[:, :10])
    with pytest.raises(ValueError, match="max_len=16"):
        dec.forward(PROMPT[:, 10:17])
    assert dec.pos == 10


def test_sliding_window_matches_transformers(tmp_path):
    """A config with sliding_window: keys more than `window` positions back are masked, as transformers does."""
    import json

    from transformers import MixtralForCausalLM

    from mixtral_nb.tiny import write_tiny

    folder = write_tiny(tmp_path / "sw", seed=3, layers=2)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sliding_window"] = 8
    (folder / "config.json").write_text(json.dumps(cfg))
    ref = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(PROMPT[:, :30]).logits[0]
        full = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, sliding_window=None).eval()
        unwindowed = full(PROMPT[:, :30]).logits[0]
    assert (want[-1] - unwindowed[-1]).abs().max() > 1e-4  # the window matters at position 29
    model = build_model("cpu", QuantConfig(None, None), offload(8, layers=2), folder)
    dec = Decoder(model, DecoderConfig(max_len=32, bucket=16))
    got = [dec.forward(PROMPT[:, :20])] + [dec.forward(PROMPT[:, t:t + 1]) for t in range(20, 30)]
    assert (torch.cat(got) - want[19:30]).abs().max().item() <= 1e-5


def test_routing_override_decides_the_experts(tiny_dir):
    """``Decoder.routing`` replaces the fused router: the experts it names are the ones that run."""
    model = build_model("cpu", QuantConfig(None, None), offload(3), tiny_dir)
    dec = Decoder(model, DecoderConfig(max_len=32, bucket=16))
    E = model.config.num_local_experts
    calls = []

    def fixed(i, h):
        calls.append(i)
        ids = torch.tensor([[E - 1, 0]]).expand(h.shape[0], 2)
        return torch.full((h.shape[0], 2), 0.5), ids

    dec.routing = fixed
    cache = model.expert_cache
    cache.reset_stats()
    dec.forward(PROMPT[:, :6])
    for t in range(6, 10):
        dec.forward(PROMPT[:, t:t + 1])
    n_layers = model.config.num_hidden_layers
    assert calls == list(range(n_layers)) * 5
    assert all(set(cache.lru[layer]) >= {0, E - 1} for layer in range(n_layers))  # the two named experts are resident
    # a prefill uses each needed expert once per layer, each decode step too: (1 + 4) x 2 uses per layer
    assert cache.hits + cache.misses == 2 * n_layers * (1 + 4)
    assert cache.misses == n_layers  # expert E-1 starts on the host (3 slots: 0, 1, 2), then stays
