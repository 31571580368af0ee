"""Other MoE families (Phi-3.5-MoE, Qwen2/3-MoE, OLMoE, DeepSeek-V2) and Mixtral through one family layer.

Each family's tiny random model is built with transformers' own config and model classes and
written by its ``save_pretrained`` (the hub's per-expert layout); the reference is transformers'
model loaded from that folder by ``from_pretrained``. mixtral_nb reads the same folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from mixtral_nb.build import build_model, expert_caches
from mixtral_nb.checkpoint import CheckpointError, quantize, resolve_checkpoint
from mixtral_nb.config import OffloadConfig, QuantConfig
from mixtral_nb.decoder import Decoder, DecoderConfig
from mixtral_nb.engine import engine_kind, make_engine
from mixtral_nb.families import FAMILIES, family_of, planner_dims, skeleton, trunk_bytes
from mixtral_nb.generate import generate
from mixtral_nb.moe import OffloadedExperts
from mixtral_nb.qlinear import QuantLinear
from mixtral_nb.tiny import TINY_FAMILIES, write_tiny_family

NAMES = sorted(TINY_FAMILIES)
META = {"scale_quant_params": {"nbits": 8, "group_size": 128}, "zero_quant_params": {"nbits": 8, "group_size": None}}
QUANT = QuantConfig(ffn_config={"weight_quant_params": {"nbits": 2, "group_size": 16, "axis": 1}, **META},
                    attn_config={"weight_quant_params": {"nbits": 4, "group_size": 16, "axis": 1}, **META})


@pytest.fixture(scope="module", params=NAMES)
def fam_dir(request, tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp(request.param) / "m", request.param, seed=3)


def _reference(folder):
    cfg = json.loads((folder / "config.json").read_text())
    return FAMILIES[cfg["model_type"]].model_class().from_pretrained(folder, dtype=torch.float32).eval()


def _offload(folder, prefetch: int) -> OffloadConfig:
    ck = resolve_checkpoint(folder)
    sk = skeleton(ck.config)
    return OffloadConfig.for_model(len(sk.moe_layers), sk.num_experts, offload_per_layer=sk.num_experts // 2,
                                   buffer_size=2, prefetch=prefetch)


def _ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_offloaded_logits_and_greedy_tokens_equal_transformers(fam_dir, prefetch):
    ref = _reference(fam_dir)
    model = build_model("cpu", None, _offload(fam_dir, prefetch), fam_dir, keep_previous=True)
    mods = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    sk = skeleton(model.config)
    assert [m.layer_idx for m in mods] == list(sk.moe_layers) and mods[0].cache.slots < sk.num_experts
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert (got - want).abs().max().item() < 1e-5
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()
    stats = model.expert_cache.stats()
    assert stats["misses"] > 0  # experts really moved through the slots
    if prefetch and len(mods) > 1:
        assert stats["prefetch_issued"] > 0


def _dequantized_reference(folder, dst, model):
    """transformers' model holding the quantized model's weights: its trunk as stored (fp16 in a project
    folder), attention and experts dequantized."""
    ref = _reference(folder)
    ck = resolve_checkpoint(dst)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            params[name].copy_(p)
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                ref.get_submodule(name).weight.copy_(m.dequantized(torch.float32))
            elif isinstance(m, OffloadedExperts):
                ex = ref.model.layers[m.layer_idx].mlp.experts
                for e in range(m.num_experts):
                    w1, w3, w2 = m.cache.fmt.dense(ck.blob(m.layer_idx, e))
                    ex.gate_up_proj[e].copy_(torch.cat([w1, w3]))
                    ex.down_proj[e].copy_(w2)
    assert family_of(ref.config).model_type == model.mixtral_nb_family
    return ref


def test_quantized_equals_reference_with_dequantized_weights(fam_dir, tmp_path):
    dst = quantize(fam_dir, tmp_path / "q", QUANT, device="cpu", progress=False)
    model = build_model("cpu", None, _offload(dst, 1), dst, keep_previous=True)
    qlin = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    sk = skeleton(model.config)
    assert set(qlin) == set(sk.attn_linears(family_of(model.config)))
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers())
    assert trunk_bytes(model.config, QUANT.attn, 4) == held  # the planner's per-family figure is exact
    ref = _dequantized_reference(fam_dir, dst, model)
    ids = _ids(seed=1)
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert (got - want).abs().max().item() < 1e-5
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


def test_fused_layout_reads_the_same(fam_dir, tmp_path):
    cfg = json.loads((fam_dir / "config.json").read_text())
    fused = write_tiny_family(tmp_path / "fused", cfg["model_type"], seed=3, fused=True)
    a = build_model("cpu", None, _offload(fam_dir, 0), fam_dir, keep_previous=True)
    b = build_model("cpu", None, _offload(fused, 0), fused, keep_previous=True)
    ids = _ids(seed=2)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_engine_on_a_cpu_is_transformers_and_the_decoder_only_where_it_applies(fam_dir):
    model = build_model("cpu", None, _offload(fam_dir, 0), fam_dir, keep_previous=True)
    engine = make_engine(model, "auto", max_length=64)
    assert engine.kind == "transformers"
    if FAMILIES[model.mixtral_nb_family].decoder:
        assert engine_kind(model, "decoder") == "decoder"
    else:
        with pytest.raises(ValueError, match=f"models only; this model is {model.mixtral_nb_family}"):
            engine_kind(model, "decoder")


@pytest.mark.parametrize("model_type,overrides", [("qwen3_moe", {}), ("qwen3_moe", {"head_dim": 32}), ("olmoe", {}),
                                                   ("olmoe", {"clip_qkv": 0.4}), ("qwen2_moe", {}), ("phimoe", {})])
def test_decoder_matches_transformers_for_other_families(tmp_path, model_type, overrides):
    """The Decoder (eager here) on Qwen3-MoE (q/k norms per head, a dense layer, heads wider than hidden/heads as
    in the real model), OLMoE (q/k norms over the whole projection, probabilities not renormalised, clipping)
    Qwen2-MoE (q/k/v biases, a gated shared expert, a dense layer) and Phi-3.5-MoE (LayerNorms, attention and
    lm_head biases, sparsemixer routing): prefill then one token at a time,
    offloaded with prefetch; logits equal transformers' within 1e-5 at every position, greedy tokens identical."""
    assert FAMILIES[model_type].decoder
    folder = write_tiny_family(tmp_path / "m", model_type, seed=3, **overrides)
    ref = _reference(folder)
    ids = _ids(n=24, seed=4)
    with torch.no_grad():
        want = ref(ids).logits[0, 11:24]
    seq = ids[:, :8]
    with torch.no_grad():  # greedy by hand: generate() would stop at, or with min_new_tokens mask, the EOS id
        for _ in range(12):
            seq = torch.cat([seq, ref(seq).logits[:, -1:].argmax(-1)], dim=1)
    tokens = seq[:, 8:]
    model = build_model("cpu", None, _offload(folder, 2), folder, keep_previous=True)
    dec = Decoder(model, DecoderConfig(max_len=40, bucket=16))
    got = [dec.forward(ids[:, :12])] + [dec.forward(ids[:, t:t + 1]) for t in range(12, 24)]
    assert (torch.cat(got) - want).abs().max().item() <= 1e-5
    assert torch.equal(generate(dec, ids[:, :8], 12), tokens)


def test_planner_dims_count_moe_layers_and_routed_experts(fam_dir):
    from mixtral_nb.planner import ModelSizes

    ck = resolve_checkpoint(fam_dir)
    d = planner_dims(ck.config)
    sk = skeleton(ck.config)
    assert d["num_hidden_layers"] == len(sk.moe_layers) and d["num_local_experts"] == sk.num_experts
    sizes = ModelSizes.of(d, QUANT)
    assert sizes.num_experts == sk.num_experts and sizes.intermediate == sk.intermediate


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v3", None])
def test_unknown_architecture_is_one_clear_error(tmp_path, model_type):
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = {"model_type": model_type, "architectures": ["SomethingForCausalLM"], "hidden_size": 64}
    (folder / "config.json").write_text(json.dumps(cfg))
    for call in (lambda: resolve_checkpoint(folder), lambda: quantize(folder, tmp_path / "q", QUANT, progress=False)):
        with pytest.raises(CheckpointError) as info:
            call()
        msg = str(info.value)
        assert repr(model_type) in msg and "qwen3_moe" in msg and "deepseek_v2" in msg and "phimoe" in msg
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "VERIFIED"}


def test_dense_layers_have_no_expert_files_and_an_interrupted_quantize_resumes(tmp_path):
    """DeepSeek-V2's layer 0 is dense: no expert file, its MLP (quantized) in the trunk. An interrupted
    quantize resumes after the finished layers, dense ones included, and ends byte-identical."""
    src = write_tiny_family(tmp_path / "ds", "deepseek_v2", seed=4)
    whole = quantize(src, tmp_path / "whole", QUANT, device="cpu", progress=False)
    files = sorted(p.name for p in whole.glob("experts-*.safetensors"))
    assert files == ["experts-001.safetensors", "experts-002.safetensors"]

    def stop(layer: int) -> None:
        if layer == 1:
            raise KeyboardInterrupt("simulated interruption")

    dst = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize(src, dst, QUANT, device="cpu", progress=False, on_layer=stop)
    assert not (dst / "COMPLETE").exists()
    redone: list[int] = []
    quantize(src, dst, QUANT, device="cpu", progress=False, on_layer=redone.append)
    assert redone == [2]
    assert _folder_bytes(dst) == _folder_bytes(whole)
    model = build_model("cpu", None, _offload(dst, 1), dst, keep_previous=True)
    assert [c.L for c in expert_caches(model)] == [2]
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantLinear)


@pytest.mark.gpu  # on the GPU machine: `make test-gpu` (conftest.py deselects it without CUDA)
def test_quantized_families_on_gpu_match_the_dequantized_reference(fam_dir, tmp_path):
    """fp32 activations on a GPU (kernels for the quantized matrices) against transformers with the
    dequantized weights on the CPU: logits close, greedy tokens identical; where the family has Mixtral's layer
    shape, 'auto' picks the Decoder and its CUDA-graph steps give the same logits."""
    dst = quantize(fam_dir, tmp_path / "q", QUANT, device="cuda", progress=False)
    model = build_model("cuda:0", None, _offload(dst, 2), dst, dtype=torch.float32, keep_previous=True)
    ref = _dequantized_reference(fam_dir, dst, model)
    ids = _ids(seed=7)
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids.cuda()).logits.cpu()
    assert (got - want).abs().max().item() < 2e-2
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.generate(ids.cuda(), **kw).tolist() == ref.generate(ids, **kw).tolist()
    assert engine_kind(model, "auto") == ("decoder" if FAMILIES[model.mixtral_nb_family].decoder else "transformers")
    if FAMILIES[model.mixtral_nb_family].decoder:  # its CUDA-graph decode steps on the same model
        dec = Decoder(model, DecoderConfig(max_len=32, bucket=16))
        with torch.no_grad():
            full = ref(ids).logits[0]
        got = [dec.forward(ids[:, :6].cuda())] + [dec.forward(ids[:, t:t + 1].cuda()) for t in range(6, ids.shape[1])]
        assert dec.use_graphs and (torch.cat(got).cpu() - full[5:]).abs().max().item() < 2e-2


CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def _write_tokenizer(folder) -> None:
    """A real (word-level) tokenizer with a ChatML-like chat template, saved beside the model, as hub
    repos ship theirs; its 256 ids cover the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(256 - len(words))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v2"])
def test_load_and_chat_with_the_family_template(tmp_path, model_type):
    from mixtral_nb.chat import ChatSession
    from mixtral_nb.load import load
    from mixtral_nb.tokenizer import encode_conversation

    folder = write_tiny_family(tmp_path / "m", model_type, seed=5)
    _write_tokenizer(folder)
    model, tok = load(str(folder), device="cpu", keep_previous=True)
    assert model.mixtral_nb_family == model_type and type(model).__name__ == FAMILIES[model_type].architecture
    chat = ChatSession(model, tok, system_prompt="w5 w6", max_new_tokens=6)
    assert chat.engine == "transformers"
    chat.send("w1 w2 w3")
    msgs = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w1 w2 w3"}]
    want = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert encode_conversation(tok, msgs) == list(want)
    assert want[:1] == [tok.convert_tokens_to_ids("<|im_start|>")]
    reply = chat.history[-1]
    assert reply["role"] == "assistant" and chat.last_stats is not None


def test_family_folder_without_tokenizer_is_one_clear_error(tmp_path):
    from mixtral_nb.load import tokenizer_for

    folder = write_tiny_family(tmp_path / "m", "olmoe", seed=6)
    with pytest.raises(CheckpointError, match="OlmoeForCausalLM needs its own tokenizer"):
        tokenizer_for(folder)


def test_unsupported_hub_repo_is_refused_before_the_download(tmp_path, monkeypatch):
    """The hub is faked (no network here): its config.json says llama; the big download never starts."""
    import huggingface_hub

    from mixtral_nb.checkpoint import hub

    def fake_config(repo_id, filename, local_dir=None, token=None, **kw):
        path = tmp_path / "cfg" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        return str(path)

    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_config)
    monkeypatch.setattr(hub, "download", lambda *a, **k: downloads.append(a))
    with pytest.raises(CheckpointError, match="model_type='llama'.*supported architectures are"):
        quantize("someone/llama-7b", tmp_path / "q", QUANT, progress=False)
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        resolve_checkpoint("someone/llama-7b")
    assert downloads == []


def test_low_precision_build_keeps_what_transformers_keeps_in_fp32(fam_dir):
    """At bf16 every trunk parameter has the dtype transformers' from_pretrained gives it (DeepSeek-V2's
    router stays fp32)."""
    cfg = json.loads((fam_dir / "config.json").read_text())
    ref = FAMILIES[cfg["model_type"]].model_class().from_pretrained(fam_dir, dtype=torch.bfloat16)
    model = build_model("cpu", None, _offload(fam_dir, 0), fam_dir, dtype=torch.bfloat16, keep_previous=True)
    want = {n: p.dtype for n, p in ref.named_parameters() if ".experts." not in n}
    got = {n: p.dtype for n, p in model.named_parameters()}
    assert got == want
    if cfg["model_type"] == "deepseek_v2":
        assert got["model.layers.1.mlp.gate.weight"] == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_quantized_folder_carries_the_tokenizer_and_loads_with_its_template(tmp_path):
    """quantize copies the original's tokenizer files before marking the folder complete, so load()
    finds the family's own tokenizer and chat template in the quantized folder."""
    from mixtral_nb.checkpoint.project import TOKENIZER_FILES
    from mixtral_nb.load import load

    src = write_tiny_family(tmp_path / "src", "qwen3_moe", seed=7)
    _write_tokenizer(src)
    dst = quantize(src, tmp_path / "q", QUANT, device="cpu", progress=False)
    copied = sorted(n for n in TOKENIZER_FILES if (dst / n).exists())
    assert copied and copied == sorted(n for n in TOKENIZER_FILES if (src / n).exists())
    assert all((dst / n).read_bytes() == (src / n).read_bytes() for n in copied)
    assert not list(dst.glob("*.tmp"))
    model, tok = load(str(dst), device="cpu", keep_previous=True)
    assert tok.chat_template == CHATML and model.mixtral_nb_family == "qwen3_moe"


def test_decoder_is_refused_where_layers_attend_differently(tmp_path):
    """Qwen2-MoE with sliding-window layers beside full ones: the Decoder builds one mask per step, so 'auto'
    keeps transformers' forward and asking for the Decoder is one clear error."""
    folder = write_tiny_family(tmp_path / "m", "qwen2_moe", seed=3, use_sliding_window=True, sliding_window=8,
                               max_window_layers=3)
    model = build_model("cpu", None, _offload(folder, 0), folder, keep_previous=True)
    assert len(set(model.config.layer_types)) == 2
    assert engine_kind(model, "auto") == "transformers"
    with pytest.raises(ValueError, match="mixes sliding-window and full layers"):
        engine_kind(model, "decoder")


def test_decoder_keeps_inside_a_longrope_models_short_range(tmp_path):
    """Phi-3.5-MoE's longrope changes its rotary scale once a sequence passes original_max_position_embeddings;
    the Decoder's rotary table is built once, so it refuses a longer cache, and within it equals transformers."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 32, "short_mscale": 1.0, "long_mscale": 1.2}
    folder = write_tiny_family(tmp_path / "m", "phimoe", seed=3, rope_parameters=rope, max_position_embeddings=256)
    model = build_model("cpu", None, _offload(folder, 0), folder, keep_previous=True)
    with pytest.raises(ValueError, match="max_len=64 is over this model's 32-position rotary range"):
        Decoder(model, DecoderConfig(max_len=64))
    ids = _ids(n=20, seed=5)
    with torch.no_grad():
        want = _reference(folder)(ids).logits[0, -1:]
    got = Decoder(model, DecoderConfig(max_len=32, bucket=16)).forward(ids)
    assert (got - want).abs().max().item() <= 1e-5
