"""The Engine protocol and the one token loop, on both engines, against transformers' own generate."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from mixtral_nb.decoder import Decoder
from mixtral_nb.engine import Engine, HFEngine, engine_kind, make_engine
from mixtral_nb.generate import Sampler, generate, generate_tokens, greedy, prefill

PROMPT = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    cfg = MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def reference(model):
    """transformers' own greedy generate (no eos: 16 tokens whatever they are)."""
    out = model.generate(PROMPT, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    return out[:, PROMPT.shape[1]:]


@pytest.fixture(params=["transformers", "decoder"])
def engine(request, model) -> Engine:
    return make_engine(model, request.param, max_length=64)


def test_make_engine_picks_by_kind(model):
    assert isinstance(make_engine(model, "decoder", max_length=32), Decoder)
    hf = make_engine(model, "transformers", max_length=32)
    assert isinstance(hf, HFEngine) and hf.max_length == 32
    assert engine_kind(model, "auto") == "transformers"  # a CPU model without an expert cache
    for e in (make_engine(model, "decoder", 32), hf):
        assert isinstance(e, Engine) and e.length == 0 and e.device == torch.device("cpu")
    with pytest.raises(ValueError, match="engine='hf'"):
        make_engine(model, "hf")


def test_greedy_loop_matches_transformers_generate(engine, reference):
    assert torch.equal(generate(engine, PROMPT, 16), reference)
    assert engine.length == PROMPT.shape[1] + 15  # the last token is yielded, never run


def test_prefill_chunks_and_truncate_are_exact(engine, model):
    with torch.no_grad():
        want = model(PROMPT).logits[0]
    engine.reset()
    last = prefill(engine, PROMPT, chunk=5)  # 5 + 5 + 2
    assert engine.length == 12 and (last[0] - want[-1]).abs().max() <= 1e-5
    engine.truncate(7)
    assert engine.length == 7
    again = prefill(engine, PROMPT[0, 7:])
    assert (again[0] - want[-1]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="truncate"):
        engine.truncate(13)
    with pytest.raises(ValueError, match=r"max_len(gth)?=64"):
        engine.forward(torch.zeros(60, dtype=torch.long))
    assert engine.length == 12  # refused before any work


def test_stop_ids_and_should_stop(engine, reference):
    first, third = int(reference[0, 0]), int(reference[0, 2])
    engine.reset()
    steps = generate_tokens(engine, PROMPT, 16, stop_ids={third})
    got = []
    with pytest.raises(StopIteration) as end:
        while True:
            got.append(int(next(steps)))
    assert got == reference[0, :2].tolist() and end.value.value == "eos"
    engine.reset()
    calls = []
    out = list(generate_tokens(engine, PROMPT, 16, should_stop=lambda: calls.append(1) or len(calls) >= 3))
    assert [int(t) for t in out] == reference[0, :3].tolist() and int(out[0]) == first
    assert engine.length == PROMPT.shape[1] + 2  # asked after each token, before running it
    assert list(generate_tokens(engine, PROMPT, 0)) == []


def test_min_new_tokens_masks_the_stop_ids(engine, reference):
    first = int(reference[0, 0])
    engine.reset()
    assert list(generate_tokens(engine, PROMPT, 8, stop_ids={first})) == []  # the first pick ends it
    engine.reset()
    out = [int(t) for t in generate_tokens(engine, PROMPT, 8, stop_ids={first}, min_new_tokens=4)]
    assert len(out) >= 4 and first not in out[:4]


def test_sampler_is_seeded_and_top_p_narrows(model):
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    assert int(greedy(logits)) == 1 and int(Sampler()(logits)) == 1
    draws = lambda s: [int(Sampler(1.0, s, torch.Generator().manual_seed(7))(logits)) for _ in range(1)]  # noqa: E731
    assert draws(1.0) == draws(1.0)
    gen = torch.Generator().manual_seed(0)
    narrow = {int(Sampler(1.0, 0.4, gen)(logits)) for _ in range(50)}
    wide = {int(Sampler(5.0, 1.0, gen)(logits)) for _ in range(200)}
    assert narrow == {1} and wide == {0, 1, 2, 3}


def test_interrupted_forward_leaves_the_transformers_engine_exact(model):
    """Ctrl-C inside layer 1: layer 0 already grew its cache; the engine's length and every layer stay as before."""
    engine = HFEngine(model, max_length=64)
    prefill(engine, PROMPT)
    handle = model.model.layers[1].self_attn.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.forward(torch.tensor([5, 6]))
    finally:
        handle.remove()
    assert engine.length == 12
    assert [(layer.keys.shape[-2], layer.values.shape[-2]) for layer in engine.kv.layers] == [(12, 12), (12, 12)]
    with torch.no_grad():
        want = model(torch.cat([PROMPT[0], torch.tensor([5, 6])])[None]).logits[0, -1]
    assert (engine.forward(torch.tensor([5, 6]))[0] - want).abs().max() <= 1e-5
