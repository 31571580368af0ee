"""The article's pre-quantized layout: a tiny checkpoint written here from the documented hqq 0.1.1 format.

The writer below packs codes the way hqq 0.1.1 stores them (step order, axis 0, 8-bit meta
with meta groups strided by M/gs, unprefixed keys inside expert files), independently of hqq's
code and of mixtral_nb.checkpoint.article. The conversion must reproduce the weights exactly (same fp32
arithmetic) and build_model must match transformers loaded with those weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixtral_nb import CheckpointError, OffloadConfig, QuantConfig, build_model, open_checkpoint
from mixtral_nb.checkpoint.article import converted_path, unpack_hqq
from mixtral_nb.qlinear import QuantLinear
from mixtral_nb.tiny import tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

L, E, H, INTER, HEADS, KV, V = 2, 4, 256, 512, 4, 2, 512


def hqq_config(nbits: int, group: int, scale_group: int) -> dict:
    """hqq 0.1.1's BaseQuantizeConfig shape (what the article passes)."""
    return {"weight_quant_params": {"nbits": nbits, "group_size": group, "axis": 0},
            "scale_quant_params": {"nbits": 8, "group_size": scale_group},
            "zero_quant_params": {"nbits": 8, "group_size": None}}


def article_quant(expert_bits: int) -> QuantConfig:
    ffn = hqq_config(2, 16, 128) if expert_bits == 2 else hqq_config(3, 64, 128)
    ffn["weight_quant_params"]["axis"] = 1  # hqq 0.2.8's default: the axis must not matter for the check
    return QuantConfig(ffn_config=ffn, attn_config=hqq_config(4, 64, 256))


# ---------------------------------------------------------------------------------------------
# a writer of hqq 0.1.1's format


def pack_step(q: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes [R*per, C] -> W_q: row r of the result holds rows r, r+R, r+2R, ... from the top bits down."""
    if nbits == 3:  # int32 words of ten 3-bit values in bits 29..0, rows padded to a multiple of 10
        rows = math.ceil(q.shape[0] / 10)
        padded = torch.zeros(10 * rows, q.shape[1], dtype=torch.int32)
        padded[: q.shape[0]] = q.to(torch.int32)
        out = torch.zeros(rows, q.shape[1], dtype=torch.int32)
        for j in range(10):
            out |= padded[j * rows:(j + 1) * rows] << (27 - 3 * j)
        return out
    per = 8 // nbits
    rows = q.shape[0] // per
    out = torch.zeros(rows, q.shape[1], dtype=torch.int32)
    for j in range(per):  # hqq 0.1.1: q[i, c] = (W_q[i mod P, c] >> (8 - b*(1 + i div P))) & (2^b - 1)
        out |= q[j * rows:(j + 1) * rows].to(torch.int32) << (8 - nbits * (j + 1))
    return out.to(torch.uint8)


def make_linear(n: int, k: int, nbits: int, g: int, gs: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Random hqq 0.1.1 tensors of a [n, k] weight, and the weight they decode to (hqq 0.1.1's formula, fp32)."""
    m = n * k // g
    q = torch.randint(0, 2**nbits, (g, m), generator=gen, dtype=torch.uint8)
    step = 1.0 / (math.sqrt(k) * 2 ** (nbits - 1))  # weights ~ 1/sqrt(k): sane logits
    scale_q = torch.randint(0, 256, (gs, m // gs), generator=gen, dtype=torch.uint8)
    ms = (torch.rand(1, m // gs, generator=gen) * 0.5 + 0.75).mul(step / 256).half()
    mz = torch.full((1, m // gs), -128.0).half()
    zmax = 2**nbits - 1
    if nbits == 4:  # round_zero: integer zero points
        zero_q = (torch.randint(0, zmax + 1, (1, m), generator=gen) * 16).clamp(max=255).to(torch.uint8)
        mzs, mzz = torch.tensor(1 / 16).half(), torch.tensor(0.0).half()
    else:
        zero_q = torch.randint(0, 256, (1, m), generator=gen, dtype=torch.uint8)
        mzs, mzz = torch.tensor(zmax / 255).half(), torch.tensor(-3.0).half()
    tensors = {"W_q": pack_step(q, nbits), "meta.scale_q": scale_q, "meta.meta_scale.scale": ms,
               "meta.meta_scale.zero": mz, "meta.zero_q": zero_q, "meta.meta_zero.scale": mzs,
               "meta.meta_zero.zero": mzz}
    c = torch.arange(m)
    s = (scale_q.reshape(-1)[c].float() - mz[0, c % (m // gs)].float()) * ms[0, c % (m // gs)].float()
    z = (zero_q[0].float() - mzz.float()) * mzs.float()
    w = ((q.float() - z[None, :]) * s[None, :]).reshape(n, k)  # f = n*K + k -> q[f div M, f mod M]
    return tensors, w


def write_article(folder: Path, expert_bits: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The article's layout at toy size; returns the floating-point state dict it decodes to."""
    gen = torch.Generator().manual_seed(seed)
    cfg = tiny_config(layers=L, experts=E, hidden=H, intermediate=INTER, heads=HEADS, kv_heads=KV, vocab=V)
    cfg["torch_dtype"] = "float16"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    nfiles = 1 + L * E
    fname = lambda i: f"model-{i:05d}-of-{nfiles:05d}.safetensors"  # noqa: E731
    ref: dict[str, torch.Tensor] = {}
    trunk: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}

    def plain(name: str, t: torch.Tensor) -> None:
        trunk[name] = t.half()
        ref[name] = t.half().float()

    plain("model.embed_tokens.weight", torch.randn(V, H, generator=gen))
    plain("lm_head.weight", torch.randn(V, H, generator=gen) / math.sqrt(H))
    plain("model.norm.weight", 1 + 0.1 * torch.randn(H, generator=gen))
    hd = H // HEADS
    eb, eg = (2, 16) if expert_bits == 2 else (3, 64)
    for i in range(L):
        p = f"model.layers.{i}"
        plain(f"{p}.input_layernorm.weight", 1 + 0.1 * torch.randn(H, generator=gen))
        plain(f"{p}.post_attention_layernorm.weight", 1 + 0.1 * torch.randn(H, generator=gen))
        plain(f"{p}.block_sparse_moe.gate.weight", torch.randn(E, H, generator=gen) * 4 / math.sqrt(H))
        for proj, (n, k) in {"q_proj": (HEADS * hd, H), "k_proj": (KV * hd, H), "v_proj": (KV * hd, H),
                             "o_proj": (H, HEADS * hd)}.items():
            t, w = make_linear(n, k, 4, 64, 256, gen)
            trunk.update({f"{p}.self_attn.{proj}.{key}": v for key, v in t.items()})
            ref[f"{p}.self_attn.{proj}.weight"] = w
        for e in range(E):
            expert: dict[str, torch.Tensor] = {}
            for wname, (n, k) in {"w1": (INTER, H), "w2": (H, INTER), "w3": (INTER, H)}.items():
                t, w = make_linear(n, k, eb, eg, 128, gen)
                expert.update({f"{wname}.{key}": v for key, v in t.items()})  # unprefixed inside the file
                ref[f"{p}.block_sparse_moe.experts.{e}.{wname}.weight"] = w
            name = fname(2 + i * E + e)
            save_file(expert, str(folder / name))
            weight_map.update({f"{p}.block_sparse_moe.experts.{e}.{key}": name for key in expert})
    save_file(trunk, str(folder / fname(1)))
    weight_map.update({key: fname(1) for key in trunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ref


def reference_model(ref: dict[str, torch.Tensor]):
    """transformers' MixtralForCausalLM holding exactly the decoded weights (fp32)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**{k: v for k, v in tiny_config(layers=L, experts=E, hidden=H, intermediate=INTER, heads=HEADS,
                                                        kv_heads=KV, vocab=V).items() if k != "model_type"})
    model = MixtralForCausalLM(cfg).eval()
    sd = {}
    for i in range(L):
        p = f"model.layers.{i}"
        ex = f"{p}.block_sparse_moe.experts"
        sd[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ref[f"{ex}.{e}.w1.weight"], ref[f"{ex}.{e}.w3.weight"]]) for e in range(E)])
        sd[f"{p}.mlp.experts.down_proj"] = torch.stack([ref[f"{ex}.{e}.w2.weight"] for e in range(E)])
        sd[f"{p}.mlp.gate.weight"] = ref[f"{p}.block_sparse_moe.gate.weight"]
    sd.update({k: v for k, v in ref.items() if ".block_sparse_moe." not in k})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


# ---------------------------------------------------------------------------------------------
# tests


def test_unpack_reads_both_hqq_packings():
    """Native [g, M] packing and the same packing of the [N, K] view (what the article's code re-packs)."""
    gen = torch.Generator().manual_seed(3)
    n, k, g = 40, 32, 16
    for nbits in (2, 3, 4):
        codes = torch.randint(0, 2**nbits, (n, k), generator=gen, dtype=torch.uint8)
        native = pack_step(codes.reshape(g, -1), nbits)
        repacked = pack_step(codes, nbits)
        assert torch.equal(unpack_hqq(native, nbits, (n, k), g), codes)
        assert torch.equal(unpack_hqq(repacked, nbits, (n, k), g), codes)


@pytest.mark.parametrize("expert_bits", [2, 3])
def test_article_checkpoint_converts_losslessly_and_matches_transformers(tmp_path, expert_bits, capsys):
    folder = tmp_path / f"Mixtral-tiny-offloading-demo-{expert_bits}bit"
    ref = write_article(folder, expert_bits, seed=expert_bits)
    offload = OffloadConfig(main_size=L * (E - 2), offload_size=L * 2, buffer_size=1, offload_per_layer=2, prefetch=1)
    model = build_model("cpu", article_quant(expert_bits), offload, folder)
    dst = converted_path(folder)
    assert dst == tmp_path / (folder.name + "-mixtral_nb") and (dst / "COMPLETE").exists()
    told = capsys.readouterr().out
    assert "lossless conversion" in told and str(dst) in told
    ck = open_checkpoint(folder)  # now a quick open of the converted copy, no second conversion
    assert ck.folder == dst and "lossless conversion" not in capsys.readouterr().out
    assert ck.quant.ffn["nbits"] == expert_bits and ck.quant.ffn["axis"] == 0 and ck.quant.attn["scale_group"] == 256

    # dequantized weights == the weights the files were made from (same fp32 arithmetic: exact)
    for i in range(L):
        p = f"model.layers.{i}"
        for e in range(E):
            w1, w3, w2 = ck.fmt.dense(ck.blob(i, e))
            for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
                torch.testing.assert_close(w, ref[f"{p}.block_sparse_moe.experts.{e}.{name}.weight"], rtol=1e-3, atol=0)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attn = getattr(model.model.layers[i].self_attn, proj)
            assert isinstance(attn, QuantLinear) and attn.spec.axis == 0
            torch.testing.assert_close(attn.dequantized(), ref[f"{p}.self_attn.{proj}.weight"], rtol=1e-3, atol=0)

    ids = torch.tensor([[1, 17, 300, 42, 7, 99, 5, 256]])
    with torch.no_grad():
        got = model(ids).logits
        want = reference_model(ref)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_article_quant_mismatch_is_refused_before_converting(tmp_path):
    folder = tmp_path / "demo"
    write_article(folder, 2)
    offload = OffloadConfig(main_size=L * (E - 2), offload_size=L * 2, buffer_size=1, offload_per_layer=2)
    with pytest.raises(CheckpointError, match=r"holds 2-bit group 16 experts, but quant_config asks for 3-bit group 64"):
        build_model("cpu", article_quant(3), offload, folder)
    assert not converted_path(folder).exists()


def test_article_missing_and_truncated_files(tmp_path):
    folder = tmp_path / "demo"
    write_article(folder, 2)
    victim = folder / f"model-00005-of-{1 + L * E:05d}.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match=r"model-00005-of-00009\.safetensors has \d+ bytes.*truncated"):
        open_checkpoint(folder)
    victim.unlink()
    with pytest.raises(CheckpointError, match=r"model-00005-of-00009\.safetensors is missing.*download it again"):
        open_checkpoint(folder)
    assert not converted_path(folder).exists()


def test_config_with_other_sizes_than_the_files_is_refused(tmp_path):
    """Twice the intermediate size makes 2-bit g16 expert codes read as 1-bit g32: never a silent model."""
    folder = tmp_path / "demo"
    write_article(folder, 2)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json's sizes probably do not match"):
        open_checkpoint(folder)
    assert not converted_path(folder).exists()


def test_converted_copy_goes_to_the_cache_when_the_folder_is_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "ro" / "demo"
    folder.mkdir(parents=True)
    assert converted_path(folder) == tmp_path / "ro" / "demo-mixtral_nb"
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    monkeypatch.setenv("MIXTRAL_NB_CACHE", str(tmp_path / "cache"))
    assert converted_path(folder) == tmp_path / "cache" / "converted" / "demo-mixtral_nb"


def test_converted_copy_is_tied_to_the_source_content(tmp_path, capsys):
    """A converted copy is reused only for the same source bytes; one written before digests existed
    (progress.json recording file sizes) is still reused."""
    folder = tmp_path / "demo"
    write_article(folder, 2)
    dst = converted_path(folder)
    open_checkpoint(folder)
    assert "lossless conversion" in capsys.readouterr().out
    prog = json.loads((dst / "progress.json").read_text())
    assert all(len(v) == 64 for v in prog["source"]["files"].values())  # content digests
    # the format of the previous version: sizes, no memo
    old = dict(prog, source={**prog["source"], "files": {n: (folder / n).stat().st_size for n in prog["source"]["files"]
                                                         if n.endswith(".safetensors")}})
    (dst / "progress.json").write_text(json.dumps(old))
    (dst / "source-memo.json").unlink()
    assert open_checkpoint(folder).folder == dst and "lossless conversion" not in capsys.readouterr().out
    (dst / "progress.json").write_text(json.dumps(prog))
    # other weights, same file sizes and the same config: refused, not mixed
    other = tmp_path / "other"
    write_article(other, 2, seed=5)
    for p in other.glob("*.safetensors"):
        (folder / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match=r"holds a conversion of another checkpoint.*delete"):
        open_checkpoint(folder)
