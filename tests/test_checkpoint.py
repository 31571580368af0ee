"""Project checkpoints: streaming/resumable quantize, both original key layouts, hub helpers, and errors.

Every error test checks that the message names the file (or the numbers) and the fix, and that it is
raised before long work starts (nothing written yet).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mixtral_nb import CheckpointError, OffloadConfig, QuantConfig, build_model, open_checkpoint, quantize
from mixtral_nb.checkpoint import read_header
from mixtral_nb.config import article_quant_config
from mixtral_nb.tiny import write_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = dict(layers=3, experts=2, hidden=64, intermediate=128)
FP16 = QuantConfig(None, None)  # experts stored as fp16 blobs: the streaming logic without the HQQ solver's cost


def ffn_only(nbits: int = 2, group: int = 16) -> QuantConfig:
    ffn = {"weight_quant_params": {"nbits": nbits, "group_size": group, "axis": 1},
           "scale_quant_params": {"nbits": 8, "group_size": 128}, "zero_quant_params": {"nbits": 8, "group_size": None}}
    return QuantConfig(ffn_config=ffn, attn_config=None)


def offload(layers: int, experts: int, opl: int = 1) -> OffloadConfig:
    return OffloadConfig(main_size=layers * (experts - opl), offload_size=layers * opl, buffer_size=1,
                         offload_per_layer=opl, prefetch=0)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but VERIFIED (it records the files' inodes, which differ between folders)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "VERIFIED"}


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("src") / "m", seed=1, shards=2, **SMALL)


@pytest.fixture(scope="module")
def small_q(small_src, tmp_path_factory) -> Path:
    """small_src quantized with the article's config, uninterrupted."""
    return quantize(small_src, tmp_path_factory.mktemp("q") / "q", article_quant_config(), device="cpu", progress=False)


# ---------------------------------------------------------------------------------------------
# streaming: peak host memory


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import psutil, torch
    from mixtral_nb.checkpoint import quantize
    from mixtral_nb.config import QuantConfig
    from mixtral_nb.tiny import write_tiny
    torch.set_num_threads(1)
    src, dst, warm = sys.argv[1:4]
    q = QuantConfig(None, None)
    write_tiny(warm + "/warm-src", layers=1, experts=2, hidden=32, intermediate=64)
    quantize(warm + "/warm-src", warm + "/warm-dst", q, device="cpu", progress=False)  # imports, first-use allocations
    def hwm():  # the kernel's exact peak RSS of this process (VmHWM), reset below
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        exact = True
    except OSError:
        exact = False
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], []
    def poll():  # fallback where VmHWM cannot be reset
        while not done:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)
    t = threading.Thread(target=poll)
    t.start()
    quantize(src, dst, q, device="cpu", progress=False)
    done.append(1)
    t.join()
    print(json.dumps({"base": base, "peak": max(peak[0], hwm() if exact else 0), "exact": exact}))
""")


def test_quantize_peak_memory_is_one_shard_plus_one_layer(tmp_path):
    L, E, H, inter = 8, 8, 512, 1024
    src = write_tiny(tmp_path / "src", seed=2, shards=L, layers=L, experts=E, hidden=H, intermediate=inter)
    shards = sorted(src.glob("model-*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    shard = max(p.stat().st_size for p in shards)
    layer = E * 3 * H * inter * 4  # one layer of fp32 experts
    bound = shard + layer + 64 * 2**20
    assert total > 2 * bound  # loading everything would break the bound by far
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path / "dst"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew = r["peak"] - r["base"]
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    assert grew < bound, f"peak RSS grew {mib(grew)}; bound {mib(bound)}, all shards {mib(total)}"
    assert (tmp_path / "dst" / "COMPLETE").exists()


# ---------------------------------------------------------------------------------------------
# resume


def test_hqq_is_deterministic_on_cpu():
    from mixtral_nb.quant import QSpec
    from mixtral_nb.quant import quantize as qt

    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    spec = QSpec.make((128, 64), article_quant_config().ffn)
    a, b = qt(w, spec), qt(w.clone(), spec)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_quantize_resumes_byte_identical(small_src, small_q, tmp_path):
    dst = tmp_path / "q"

    def stop_after_second(layer: int) -> None:
        if layer == 1:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        quantize(small_src, dst, article_quant_config(), device="cpu", progress=False, on_layer=stop_after_second)
    assert (dst / "experts-001.safetensors").exists() and not (dst / "experts-002.safetensors").exists()
    assert not (dst / "COMPLETE").exists() and not (dst / "manifest.json").exists()
    with pytest.raises(CheckpointError, match="unfinished.*rerun quantize"):
        open_checkpoint(dst)  # a partial folder never looks complete

    redone: list[int] = []
    quantize(small_src, dst, article_quant_config(), device="cpu", progress=False, on_layer=redone.append)
    assert redone == [2]  # layers 0 and 1 were skipped
    assert folder_bytes(dst) == folder_bytes(small_q)
    assert not (dst / "parts").exists()


def test_rerun_with_other_settings_is_refused_unless_overwrite(small_src, tmp_path):
    dst = tmp_path / "q"
    quantize(small_src, dst, FP16, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"different settings.*overwrite=True"):
        quantize(small_src, dst, ffn_only(), device="cpu", progress=False)
    quantize(small_src, dst, ffn_only(), device="cpu", progress=False, overwrite=True)
    ck = open_checkpoint(dst)
    assert ck.quant.ffn["nbits"] == 2 and ck.fmt.specs is not None
    # same settings again: nothing to do
    calls: list[int] = []
    quantize(small_src, dst, ffn_only(), device="cpu", progress=False, on_layer=calls.append)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# both original key layouts


def test_both_key_layouts_quantize_to_the_same_files(small_src, tmp_path):
    from safetensors import safe_open
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(small_src, dtype=torch.float32)
    legacy, fused = tmp_path / "legacy", tmp_path / "fused"
    model.save_pretrained(legacy)
    model.save_pretrained(fused, save_original_format=False)
    with safe_open(str(legacy / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in f.keys()  # transformers 5's default
    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    outs = [quantize(s, tmp_path / f"q-{s.name}", FP16, device="cpu", progress=False)  # fp16 blobs: exact weights
            for s in (small_src, legacy, fused)]
    files = [folder_bytes(o) for o in outs]
    for name in [n for n in files[0] if n.endswith(".safetensors")]:
        assert files[1][name] == files[0][name] and files[2][name] == files[0][name], name


def test_built_model_from_quantized_folder_matches_on_the_fly(small_src, small_q):
    """build_model on the written folder == build_model quantizing the original folder on the fly.

    The expert blobs are identical; logits differ only by the fp16 rounding of the stored trunk.
    """
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    a = build_model("cpu", None, offload(3, 2), small_q)
    b = build_model("cpu", article_quant_config(), offload(3, 2), small_src)
    assert a.expert_cache.mirror and b.expert_cache.mirror  # every expert on the host, in order
    assert all(torch.equal(x, y) for x, y in zip(a.expert_cache.host, b.expert_cache.host))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# errors, raised before long work starts


def write_manifest(folder: Path, m: dict) -> None:
    """Replace a manifest and the digest of it in COMPLETE (a consistent folder whose manifest lies)."""
    from mixtral_nb.checkpoint.integrity import bytes_digest

    text = json.dumps(m)
    (folder / "manifest.json").write_text(text)
    (folder / "COMPLETE").write_text(json.dumps({"manifest": bytes_digest(text.encode())}))


def copy_src(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard(small_src, tmp_path):
    src = copy_src(small_src, tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors is missing.*download it again"):
        quantize(src, tmp_path / "q", FP16, progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(CheckpointError, match="missing"):
        build_model("cpu", FP16, offload(3, 2), src)


def test_truncated_shard(small_src, tmp_path):
    src = copy_src(small_src, tmp_path / "src")
    p = src / "model-00001-of-00002.safetensors"
    os.truncate(p, p.stat().st_size - 3)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors has \d+ bytes.*truncated.*download"):
        quantize(src, tmp_path / "q", FP16, progress=False)
    assert not (tmp_path / "q").exists()


def test_corrupt_header(small_src, tmp_path):
    src = copy_src(small_src, tmp_path / "src")
    p = src / "model-00002-of-00002.safetensors"
    with open(p, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage\xff" * 4)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors has a corrupt safetensors header"):
        open_checkpoint(src)
    with open(p, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))  # header length beyond the file
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_header(p)


def test_not_mixtral(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "llama"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"config\.json describes model_type='llama'.*Mixtral"):
        quantize(folder, tmp_path / "q", FP16, progress=False)


def test_missing_expert_tensor(small_src, tmp_path):
    src = copy_src(small_src, tmp_path / "src")
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.2.block_sparse_moe.experts.1.w2.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"experts\.1\.w2\.weight is missing.*download it again"):
        quantize(src, tmp_path / "q", FP16, progress=False)


def test_quant_settings_that_disagree_with_the_files(small_q, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds 2-bit group 16 experts, but quant_config asks for 3-bit group 64"):
        build_model("cpu", ffn_only(3, 64), offload(3, 2), small_q)
    # a manifest whose settings do not match the stored blobs
    bad = copy_src(small_q, tmp_path / "bad")
    m = json.loads((bad / "manifest.json").read_text())
    m["attn_specs"]["model.layers.0.self_attn.q_proj"]["group_size"] = 32
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"manifest\.json does not match the digest recorded in COMPLETE"):
        open_checkpoint(bad)  # an edited manifest
    write_manifest(bad, m)
    with pytest.raises(CheckpointError, match=r"trunk\.safetensors.*q_proj.*re-create it"):
        open_checkpoint(bad)


def test_manifest_with_missing_fields(small_q, tmp_path):
    bad = copy_src(small_q, tmp_path / "bad")
    m = json.loads((bad / "manifest.json").read_text())
    del m["expert_format"]
    write_manifest(bad, m)
    with pytest.raises(CheckpointError, match=r"manifest\.json has no 'expert_format' field.*overwrite=True"):
        open_checkpoint(bad)


def test_project_file_truncated(small_q, tmp_path):
    bad = copy_src(small_q, tmp_path / "bad")
    p = bad / "experts-001.safetensors"
    os.truncate(p, p.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"experts-001\.safetensors has \d+ bytes, the manifest says"):
        open_checkpoint(bad)


def test_not_enough_disk(small_src, tmp_path, monkeypatch):
    import shutil

    from mixtral_nb.checkpoint.hub import NotEnoughDiskError

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(NotEnoughDiskError, match=r"needs \d+\.\d GB .* only 0\.0 GB is free.*larger disk"):
        quantize(small_src, tmp_path / "q", FP16, progress=False)
    assert not list((tmp_path / "q").glob("experts-*"))


# ---------------------------------------------------------------------------------------------
# hub helpers (no network: the hub calls are replaced)


def test_check_disk_counts_only_missing_files(tmp_path, monkeypatch):
    import shutil

    from mixtral_nb.checkpoint.hub import NotEnoughDiskError, check_disk

    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, 5 * 10**8))
    assert check_disk({"a.bin": 100, "b.bin": 10**8}, tmp_path, margin=0) == 10**8  # a.bin is done
    with pytest.raises(NotEnoughDiskError, match=r"needs 0\.6 GB .* only 0\.5 GB is free"):
        check_disk({"a.bin": 99, "b.bin": 6 * 10**8}, tmp_path / "new" / "dir", margin=0)


def _response(code: int):
    import httpx2

    return httpx2.Response(code, request=httpx2.Request("GET", "https://huggingface.co/x"))


def test_download_explains_gated_and_offline(tmp_path, monkeypatch):
    from huggingface_hub import errors

    from mixtral_nb.checkpoint import hub

    def gated(*a, **k):
        raise errors.GatedRepoError("403 gated", response=_response(403))

    monkeypatch.setattr(hub, "repo_sizes", gated)
    with pytest.raises(hub.HubError, match=r"this repo is gated: accept the licence at "
                                           r"https://huggingface.co/mistralai/Mixtral-8x7B-v0.1 and pass token=.*mistral-common"):
        hub.download("mistralai/Mixtral-8x7B-v0.1", tmp_path / "m")

    def offline(*a, **k):
        raise errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(hub, "repo_sizes", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match=r"HF_HUB_OFFLINE is set.*not all in the local folder"):
        hub.download("org/repo", tmp_path / "empty")
    done = write_tiny(tmp_path / "done", layers=1, experts=2, hidden=32, intermediate=64, shards=2)
    assert hub.download("org/repo", done) == done  # offline, but already downloaded: use it
    assert isinstance(hub.explain_error(errors.RepositoryNotFoundError("404", response=_response(404)), "a/b"),
                      CheckpointError)
    assert hub.explain_error(ValueError("unrelated"), "a/b") is None


def test_download_checks_disk_before_fetching(tmp_path, monkeypatch):
    import shutil

    from mixtral_nb.checkpoint import hub

    monkeypatch.setattr(hub, "repo_sizes", lambda *a, **k: {"model-00001-of-00002.safetensors": 30 * 10**9,
                                                            "config.json": 1000})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 20 * 10**9))

    def no_fetch(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_fetch)
    with pytest.raises(hub.NotEnoughDiskError, match=r"needs 30\.0 GB .* only 20\.0 GB is free"):
        hub.download("org/repo", tmp_path / "m")


def test_quantize_accepts_a_hub_id(small_src, tmp_path, monkeypatch):
    from mixtral_nb.checkpoint import hub

    asked = []

    def fake_download(repo_id, local_dir, token=None, allow_patterns=None, revision=None):
        asked.append((repo_id, Path(local_dir)))
        return small_src

    monkeypatch.setattr(hub, "download", fake_download)
    out = quantize("someone/Mixtral-tiny", tmp_path / "q", FP16, progress=False)
    assert asked == [("someone/Mixtral-tiny", tmp_path / "someone--Mixtral-tiny")]
    assert open_checkpoint(out).fmt.specs is None
