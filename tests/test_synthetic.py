"""Synthetic full-size checkpoints: read by the same readers as the real files, at toy and full size.

Toy-size folders go the user's whole way (article folder -> conversion -> build_model -> logits; HF
folder -> quantize on the fly -> logits). Full size is checked without writing gigabytes: sparse files
carrying the writer's exact headers go through ArticleCheckpoint's and HFCheckpoint's validation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mixtral_nb import OffloadConfig, build_model
from mixtral_nb import synthetic
from mixtral_nb.__main__ import main
from mixtral_nb.checkpoint import ArticleCheckpoint, converted_path
from mixtral_nb.checkpoint import CheckpointError, HFCheckpoint
from mixtral_nb.config import article_quant_config
from mixtral_nb.checkpoint import NotEnoughDiskError
from mixtral_nb.synthetic import (
    article_layout, file_sizes, hf_layout, safetensors_header, write_article_checkpoint, write_hf_checkpoint,
)
from mixtral_nb.tiny import tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

E = 4


def toy(layers: int = 2, experts: int = E) -> dict:
    """The smallest sizes the article's group sizes divide (attention: 64-groups in 256-meta groups)."""
    return tiny_config(layers=layers, experts=experts, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=256)


def offload(layers: int, experts: int = E) -> OffloadConfig:
    per = experts // 2
    return OffloadConfig(main_size=layers * (experts - per), offload_size=layers * per, buffer_size=1,
                         offload_per_layer=per, prefetch=1)


def logits_of(model) -> torch.Tensor:
    ids = torch.tensor([[1, 17, 200, 42, 7, 99, 5, 255]])
    with torch.no_grad():
        return model(ids).logits.float()


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------
# through the real readers


def test_article_folder_converts_builds_and_gives_sane_logits(tmp_path):
    folder = write_article_checkpoint(tmp_path / "demo", config=toy(), seed=1)
    ck = ArticleCheckpoint(folder, device="cpu")
    assert ck.quant.ffn["nbits"] == 2 and ck.quant.ffn["group_size"] == 16 and ck.quant.ffn["scale_group"] == 128
    assert ck.quant.attn["nbits"] == 4 and ck.quant.attn["group_size"] == 64 and ck.quant.attn["scale_group"] == 256
    # dequantized weights: std near 1/sqrt(in_features), as the values are designed
    w1, w3, w2 = ck.fmt.dense(ck.expert_blob(1, 3))
    for w, k in ((w1, 256), (w3, 256), (w2, 512)):
        assert torch.isfinite(w).all() and 0.7 < w.std().item() * k ** 0.5 < 1.5
    ck.close()

    model = build_model("cpu", article_quant_config(), offload(2), folder)
    assert (converted_path(folder) / "COMPLETE").exists()
    logits = logits_of(model)
    assert torch.isfinite(logits).all() and 0.1 < logits.std().item() < 20


def test_hf_folder_quantizes_builds_and_gives_sane_logits(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "hf", config=toy(), seed=2, shard_bytes=1_000_000)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ck = HFCheckpoint(folder)
    w1, _, w2 = ck.expert(1, 2)
    assert w1.dtype == torch.float16 and 0.5 < w1.float().std().item() * 256 ** 0.5 < 1.5
    assert 0.5 < w2.float().std().item() * 512 ** 0.5 < 1.5
    model = build_model("cpu", article_quant_config(), offload(2), folder)
    logits = logits_of(model)
    assert torch.isfinite(logits).all() and 0.1 < logits.std().item() < 20


def test_deep_stack_stays_finite_in_fp16(tmp_path):
    """32 layers like the real model: the residual stream must not blow up in half precision."""
    folder = write_article_checkpoint(tmp_path / "deep", config=toy(32, experts=2), seed=3)
    model = build_model("cpu", None, offload(32, experts=2), folder, dtype=torch.float16)
    logits = logits_of(model)
    assert torch.isfinite(logits).all() and logits.abs().max().item() < 100


# ---------------------------------------------------------------------------------------------
# full size, from the layout alone


def sparse_folder(folder: Path, headers: dict, sizes: dict[str, int], metadata: dict | None = None) -> None:
    """The writer's exact headers in files of the full size, with holes for data (no disk used)."""
    folder.mkdir()
    for name, entries in headers.items():
        with open(folder / name, "wb") as f:
            f.write(safetensors_header(entries, metadata))
            f.truncate(sizes[name])


def test_full_size_article_layout_is_what_article_checkpoint_expects(tmp_path):
    cfg = synthetic.mixtral_config()
    headers = article_layout()
    sizes = file_sizes(headers)
    assert len(headers) == 257 and list(headers)[0] == "model-00001-of-00257.safetensors"
    expert = headers["model-00002-of-00257.safetensors"]
    assert expert["w1.W_q"] == ("U8", (4, 3670016)) and expert["w1.meta.scale_q"] == ("U8", (128, 28672))
    assert expert["w1.meta.meta_scale.scale"] == ("F16", (1, 28672)) and expert["w1.meta.zero_q"] == ("U8", (1, 3670016))
    assert expert["w2.meta.meta_zero.zero"] == ("F16", ())
    trunk = headers["model-00001-of-00257.safetensors"]
    assert trunk["model.embed_tokens.weight"] == ("F16", (32000, 4096))
    assert trunk["model.layers.31.self_attn.k_proj.W_q"] == ("U8", (32, 65536))  # 1024x4096 in 64-groups
    assert trunk["model.layers.31.self_attn.q_proj.meta.scale_q"] == ("U8", (256, 1024))

    folder = tmp_path / "demo"
    sparse_folder(folder, headers, sizes)
    layout = synthetic._article_layout(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / synthetic.INDEX).write_text(json.dumps({"weight_map": synthetic._article_weight_map(cfg, layout)}))
    ck = ArticleCheckpoint(folder, device="cpu")  # validates every header of every file against config.json
    assert ck.config.num_hidden_layers == 32 and ck.config.num_local_experts == 8
    assert (ck.quant.ffn["nbits"], ck.quant.ffn["group_size"]) == (2, 16)
    assert (ck.quant.attn["nbits"], ck.quant.attn["group_size"], ck.quant.attn["scale_group"]) == (4, 64, 256)
    data = sum(_count(s) * {"U8": 1, "F16": 2}[d] for d, s in expert.values())
    assert data == 3 * (4 * 3670016 + 128 * 28672 + 2 * 2 * 28672 + 3670016 + 2 * 2)  # w1, w2, w3 as above
    assert data < sizes["model-00002-of-00257.safetensors"] < data + 4096  # plus the header
    assert 0 <= ck.fmt.layout.total_bytes - data < 1024  # the converted blob: same bytes, aligned segments
    assert ck.trunk_bytes() == sizes["model-00001-of-00257.safetensors"]


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_full_size_hf_layout_is_what_hf_checkpoint_expects(tmp_path):
    headers = hf_layout()
    sizes = file_sizes(headers, {"format": "pt"})
    assert len(headers) == 19  # the hub's Mixtral-8x7B has 19 shards of at most 5 GB
    params = sum(_count(s) for entries in headers.values() for _, s in entries.values())
    assert params == 46_702_792_704  # Mixtral-8x7B's parameter count
    folder = tmp_path / "hf"
    sparse_folder(folder, headers, sizes, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(synthetic.mixtral_config()))
    wm = {k: name for name, entries in headers.items() for k in entries}
    (folder / synthetic.INDEX).write_text(json.dumps({"weight_map": wm}))
    ck = HFCheckpoint(folder)  # every expected tensor, with its shape
    assert not ck.fused and ck.config.intermediate_size == 14336


# ---------------------------------------------------------------------------------------------
# determinism, reruns, refusals


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = tree(write_article_checkpoint(tmp_path / "a", config=toy(1), seed=5))
    b = tree(write_article_checkpoint(tmp_path / "b", config=toy(1), seed=5))
    c = tree(write_article_checkpoint(tmp_path / "c", config=toy(1), seed=6))
    assert a == b
    assert all(a[n] != c[n] for n in a if n.endswith(".safetensors"))
    assert a["config.json"] == c["config.json"] and a[synthetic.INDEX] == c[synthetic.INDEX]
    h1 = tree(write_hf_checkpoint(tmp_path / "h1", config=toy(1), seed=5))
    h2 = tree(write_hf_checkpoint(tmp_path / "h2", config=toy(1), seed=5))
    assert h1 == h2


def test_existing_destination_is_returned_when_same_and_refused_otherwise(tmp_path):
    dst = write_article_checkpoint(tmp_path / "demo", config=toy(1), seed=0)
    stamp = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    assert write_article_checkpoint(tmp_path / "demo", config=toy(1), seed=0) == dst
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == stamp  # nothing rewritten
    with pytest.raises(CheckpointError, match=r"already exists and is not a synthetic article checkpoint.*seed 1"):
        write_article_checkpoint(tmp_path / "demo", config=toy(1), seed=1)
    with pytest.raises(CheckpointError, match="already exists"):
        write_hf_checkpoint(tmp_path / "demo", config=toy(1), seed=0)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="delete it or choose another destination"):
        write_article_checkpoint(other, config=toy(1))
    assert (other / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_article_checkpoint(empty, config=toy(1)) / synthetic.MARKER).exists()


def test_not_enough_disk_is_refused_before_writing_anything(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2 * 1024**3))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(NotEnoughDiskError, match=r"writing to \S+/demo needs 18\.2 GB .* only 2\.1 GB is free.*larger disk"):
        write_article_checkpoint(tmp_path / "demo")
    with pytest.raises(NotEnoughDiskError, match=r"needs 93\.4 GB"):
        write_hf_checkpoint(tmp_path / "sub" / "hf", num_layers=32)
    assert sorted(tmp_path.iterdir()) == before
    assert main(["synthetic", "--layout", "hf", str(tmp_path / "cli"), "--layers", "1"]) == 1
    assert sorted(tmp_path.iterdir()) == before


def test_interrupted_write_leaves_no_complete_looking_folder_and_resumes(tmp_path, monkeypatch):
    real = synthetic._chunks
    calls = {"n": 0}
    files = list(article_layout(toy(2)).values())
    stop = sum(len(entries) for entries in files[:3]) + 5  # inside the third expert file (one chunk per tensor here)

    def failing(t, rng):
        for chunk in real(t, rng):
            calls["n"] += 1
            if calls["n"] == stop:
                raise OSError("disk went away")
            yield chunk

    monkeypatch.setattr(synthetic, "_chunks", failing)
    dst = tmp_path / "demo"
    with pytest.raises(OSError, match="disk went away"):
        write_article_checkpoint(dst, config=toy(2), seed=4)
    assert not dst.exists()
    staging = tmp_path / ".demo.partial"
    assert any(p.name.endswith(".tmp") for p in staging.iterdir())
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("cpu", None, offload(2), dst)

    monkeypatch.setattr(synthetic, "_chunks", real)
    write_article_checkpoint(dst, config=toy(2), seed=4)  # resumes
    assert not staging.exists()
    assert tree(dst) == tree(write_article_checkpoint(tmp_path / "fresh", config=toy(2), seed=4))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"num_layers=0: give 1\.\.32"):
        write_article_checkpoint(tmp_path / "x", num_layers=0)
    with pytest.raises(ValueError, match=r"config lacks positive integer hidden_size"):
        write_hf_checkpoint(tmp_path / "x", config={"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="do not divide|does not split"):
        write_article_checkpoint(tmp_path / "x", config=tiny_config(hidden=64, intermediate=128))
    assert not (tmp_path / "x").exists()
