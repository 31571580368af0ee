"""Streamed decode steps (streamed.py) on a GPU: the whole step one CUDA graph, the host serving the
misses while it replays. Same logits, greedy tokens and cache counters as per-layer graphs with a
host sync per layer; an interrupted serve leaves the sequence as it was and the next step right."""

from __future__ import annotations

import pytest
import torch

from mixtral_nb import OffloadConfig, article_quant_config, build_model
from mixtral_nb.decoder import Decoder, DecoderConfig
from mixtral_nb.streamed import ExpertStream

PROMPT = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(3))


def _model(tiny_dir):
    cfg = OffloadConfig.for_slots(8, (3, 2, 4, 3), buffer_size=2, prefetch=0, extra_host_slots=1, clean_window=8)
    return build_model("cuda", article_quant_config(), cfg, tiny_dir, dtype=torch.float32, host_mirror=False,
                       keep_previous=True)


def _greedy(dec: Decoder, n: int) -> tuple[list[int], list[torch.Tensor]]:
    dec.reset()
    logits = dec.forward(PROMPT.cuda())
    toks, outs = [], [logits]
    for _ in range(n):
        toks.append(int(logits.argmax(-1)))
        logits = dec.forward(torch.tensor([[toks[-1]]], device="cuda"))
        outs.append(logits)
    return toks, outs


@pytest.mark.gpu
def test_streamed_steps_match_per_layer_graphs(tiny_dir):
    ref_model, model = _model(tiny_dir), _model(tiny_dir)
    ref = Decoder(ref_model, DecoderConfig(max_len=64, bucket=16, stream_experts=False))
    dec = Decoder(model, DecoderConfig(max_len=64, bucket=16))
    assert ref.stream is None and dec.stream is not None and dec.one_graph
    want_toks, want = _greedy(ref, 24)
    got_toks, got = _greedy(dec, 24)
    assert got_toks == want_toks
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-3
    s_ref, s = ref_model.expert_cache.stats(wait=True), model.expert_cache.stats(wait=True)
    for key in ("hits", "misses", "bytes_h2d", "bytes_d2h"):
        assert s[key] == s_ref[key], key
    assert s["misses"] > 0 and s["host_syncs"] < s_ref["host_syncs"]  # misses served; no sync per layer


@pytest.mark.gpu
def test_an_interrupted_streamed_step_leaves_the_sequence_as_it_was(tiny_dir, monkeypatch):
    model = _model(tiny_dir)
    dec = Decoder(model, DecoderConfig(max_len=64, bucket=16))
    toks, want = _greedy(dec, 6)
    dec.truncate(PROMPT.shape[1] + 2)  # the prompt, toks[0] and toks[1]: toks[2] comes next
    calls = {"n": 0}
    serve = ExpertStream.serve

    def stop_at_layer_two(self, module, seq, main):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("Stop")
        return serve(self, module, seq, main)

    monkeypatch.setattr(ExpertStream, "serve", stop_at_layer_two)
    with pytest.raises(KeyboardInterrupt):
        dec.forward(torch.tensor([[toks[2]]], device="cuda"))
    monkeypatch.setattr(ExpertStream, "serve", serve)
    assert dec.length == PROMPT.shape[1] + 2
    for t in range(3, 7):  # the same steps again, from a cache the interrupted one left changed
        logits = dec.forward(torch.tensor([[toks[t - 1]]], device="cuda"))
        assert (logits - want[t]).abs().max().item() < 1e-3


def test_blocking_launches_keep_streamed_steps_off(monkeypatch):
    """CUDA_LAUNCH_BLOCKING=1 would make the replay of a graph that waits for the host never return."""
    from mixtral_nb.streamed import launches_wait

    monkeypatch.delenv("CUDA_LAUNCH_BLOCKING", raising=False)
    assert not launches_wait()
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    assert launches_wait()
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "0")
    assert not launches_wait()
