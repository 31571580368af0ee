"""The upcycled SmolLM2 -> Mixtral checkpoint behaves exactly like the dense model it came from.

Real models, no mocks. The dense GGUF model is loaded first so that ``build_embedded`` reuses
it (the GGUF parse is the slow part, ~20 s on CPU); everything else shares one Mixtral load.
"""

import inspect
import json
import os
import shutil
import time

import pydoc_data.topics
import pytest
import torch
from safetensors import safe_open

from mixtral_nb.embedded import MARKER_NAME, build_embedded, dense_model_path, load_dense

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers is imported lazily below, after this

pytestmark = pytest.mark.slow  # builds real models (~40 s for the whole file on 2 idle cores)

PROMPT_TOKENS = 64


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model, tokenizer = load_dense(torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def built(dense, tmp_path_factory):
    cache = tmp_path_factory.mktemp("mixtral_nb_cache")
    start = time.perf_counter()
    path = build_embedded(cache)
    yield cache, path, time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)  # ~3 GB; pytest would keep it for 3 sessions


@pytest.fixture(scope="module")
def mixtral(built):
    from transformers import AutoTokenizer, MixtralForCausalLM

    _, path, _ = built
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def offloaded(built, mixtral):
    """The same folder through mixtral_nb's engine: fp32, 4 of 8 experts per layer in (CPU) slots."""
    from mixtral_nb import OffloadConfig, QuantConfig, build_model

    _, path, _ = built
    cfg = OffloadConfig(main_size=30 * 4, offload_size=30 * 4, buffer_size=2, offload_per_layer=4, prefetch=1)
    return build_model("cpu", QuantConfig(None, None), cfg, path), mixtral[1]


@pytest.fixture(scope="module")
def prompt_ids(mixtral):
    _, tokenizer = mixtral
    messages = [
        {
            "role": "user",
            "content": "Explain in a few sentences why the sky is blue during the day and red at sunset, "
            "then list three colours of the rainbow and name one famous painter who liked skies.",
        }
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    assert ids.shape[1] >= PROMPT_TOKENS
    return ids[:, :PROMPT_TOKENS]


@pytest.fixture(scope="module")
def prompt_outputs(dense, mixtral, prompt_ids):
    with torch.no_grad():
        dense_out = dense[0](prompt_ids)
        moe_out = mixtral[0](prompt_ids, output_router_logits=True)
    return dense_out, moe_out


def test_folder_layout_and_configs(built, dense):
    from transformers import MixtralConfig

    _, path, _ = built
    config = MixtralConfig.from_pretrained(path)
    dense_config = dense[0].config
    assert config.architectures == ["MixtralForCausalLM"]
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(config, name) == getattr(dense_config, name), name
    assert config.rope_parameters["rope_theta"] == dense_config.rope_parameters["rope_theta"]

    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)
    assert json.loads((path / MARKER_NAME).read_text())["num_experts"] == 8

    with safe_open(path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.3.block_sparse_moe.gate.weight").get_shape() == [8, 576]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                     p + "block_sparse_moe.gate.weight"}
        expected |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        expected |= {f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(8) for w in ("w1", "w2", "w3")}
    assert keys == expected
    assert dense_model_path().is_file()


def test_logits_equal_dense(prompt_outputs):
    dense_out, moe_out = prompt_outputs
    ref, got = dense_out.logits, moe_out.logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, rel


def test_routing_varies(prompt_outputs):
    _, moe_out = prompt_outputs
    distinct = [logits.topk(2, dim=-1).indices.unique().numel() for logits in moe_out.router_logits]
    assert len(distinct) == 30
    assert sum(n >= 6 for n in distinct) >= 0.8 * len(distinct), distinct


@pytest.mark.parametrize("which", ["mixtral", "offloaded"])
def test_greedy_answer(which, request):
    model, tokenizer = request.getfixturevalue(which)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    if which == "offloaded":
        assert model.expert_cache.stats()["misses"] > 0  # the cache really swapped experts


@pytest.mark.parametrize("which", ["mixtral", "offloaded"])
def test_perplexity_equal_dense(dense, which, request):
    model, tokenizer = request.getfixturevalue(which)
    text = inspect.getsource(pydoc_data.topics)[:20_000]  # plenty for 256 tokens
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    with torch.no_grad():  # no output_router_logits here: it would add the aux loss to .loss
        ppl_dense = torch.exp(dense[0](ids, labels=ids).loss).item()
        ppl_moe = torch.exp(model(ids, labels=ids).loss).item()
    assert abs(ppl_moe / ppl_dense - 1) < 0.01, (ppl_moe, ppl_dense)
    assert ppl_dense < 20, ppl_dense  # sanity: the model actually predicts Python source


def test_cached_and_rebuilt(built, monkeypatch):
    cache, path, _ = built
    start = time.perf_counter()
    assert build_embedded(cache) == path
    assert time.perf_counter() - start < 1.0
    monkeypatch.setenv("MIXTRAL_NB_CACHE", str(cache))
    assert build_embedded() == path

    # A folder without the completion marker (an interrupted build) is not trusted: rebuilt.
    # One expert keeps this rebuild small.
    partial = cache / path.name.replace("-e8-k2-", "-e1-k1-")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    again = build_embedded(cache, num_experts=1, top_k=1)
    assert again == partial
    assert (again / MARKER_NAME).is_file()
    assert json.loads((again / "config.json").read_text())["num_local_experts"] == 1
    with safe_open(again / "model.safetensors", framework="pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in f.keys()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no temp folders left behind


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_embedded(tmp_path, num_experts=2, top_k=3)


# ------------------------------------------------------------------ the default quantization of the chat model


def test_default_quantization_is_the_smallest_sensible_measured():
    """The default is the smallest setting of the precomputed table that holds the multi-turn check."""
    from pathlib import Path

    from mixtral_nb.load import embedded_quant_config
    from mixtral_nb.quality import CONFIGS, load_results, smallest_sensible

    rows = load_results(Path(__file__).resolve().parent.parent / "notebooks" / "quality_embedded.json")["rows"]
    measured = [r for r in rows if "follow_ups" in r]
    best = smallest_sensible(measured)
    assert best is not None and best["paris"] and best["follow_ups"]
    smaller = [r for r in measured if r["total_bytes"] < best["total_bytes"]]
    assert smaller and not any(r["follow_ups"] for r in smaller)  # a smaller setting was tried, and failed
    experts, attn = CONFIGS[best["name"]]
    q = embedded_quant_config()
    settings = [None if part is None else (part["nbits"], part["group_size"]) for part in (q.ffn, q.attn)]
    assert settings == [experts, attn]  # None: kept in floating point


def test_default_embedded_model_holds_a_three_turn_chat():
    """What a user of the CPU notebooks sees: the default checkpoint, loaded as the notebooks load it,
    answers the follow-ups sensibly (3-bit experts with 4-bit attention said Italians speak French)."""
    from mixtral_nb.chat import ChatSession
    from mixtral_nb.load import load
    from mixtral_nb.quality import ANSWER_TOKENS, TURNS

    model, tokenizer = load("embedded", device="cpu")
    session = ChatSession(model, tokenizer, max_new_tokens=ANSWER_TOKENS)
    for message, word in TURNS:
        reply = session.send(message)
        assert word in reply, (message, reply)
