"""Checksums, structural validation and the writer's lock (issue 17): corrupt or foreign input ends in
one CheckpointError naming the file and the fix, before anything is built or written.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_nb import CheckpointError, OffloadConfig, QuantConfig, build_model, open_checkpoint, quantize
from mixtral_nb.checkpoint import read_header, verify
from mixtral_nb.tiny import write_tiny

SMALL = dict(layers=3, experts=2, hidden=64, intermediate=128)
FP16 = QuantConfig(None, None)
IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def offload(layers: int = 3, experts: int = 2) -> OffloadConfig:
    return OffloadConfig(main_size=layers * (experts - 1), offload_size=layers, buffer_size=1, offload_per_layer=1,
                         prefetch=0)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("src") / "m", seed=1, shards=2, **SMALL)


@pytest.fixture(scope="module")
def project(src, tmp_path_factory) -> Path:
    return quantize(src, tmp_path_factory.mktemp("q") / "q", FP16, device="cpu", progress=False)


@pytest.fixture(scope="module")
def ref_logits(project) -> torch.Tensor:
    with torch.no_grad():
        return build_model("cpu", None, offload(), project)(IDS).logits


def write_manifest(folder: Path, m: dict) -> None:
    """Replace a manifest and the digest of it in COMPLETE (a consistent folder whose manifest lies)."""
    from mixtral_nb.checkpoint.integrity import bytes_digest

    text = json.dumps(m)
    (folder / "manifest.json").write_text(text)
    (folder / "COMPLETE").write_text(json.dumps({"manifest": bytes_digest(text.encode())}))


def alive(cls: type) -> int:
    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


def copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("VERIFIED"))
    return dst


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def flip(path: Path, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def set_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------
# corrupt data


def test_flipped_bytes_in_an_expert_file_are_caught_before_building(project, tmp_path):
    bad = copy(project, tmp_path / "bad")
    p = bad / "experts-001.safetensors"
    size = p.stat().st_size
    flip(p, data_start(p) + (size - data_start(p)) * 3 // 4)  # inside expert 1's blob
    with pytest.raises(CheckpointError, match=r"experts-001\.safetensors \(experts \[1\]\) does not match the digest"
                                              r".*corrupt.*re-create it"):
        build_model("cpu", None, offload(), bad)


def test_trunk_full_of_ff_is_caught(project, tmp_path):
    bad = copy(project, tmp_path / "bad")
    p = bad / "trunk.safetensors"
    start = data_start(p)
    with open(p, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * (p.stat().st_size - start))  # NaNs in fp16, same size, header intact
    from mixtral_nb.build import live_models

    before = len(live_models())
    with pytest.raises(CheckpointError, match=r"trunk\.safetensors does not match the digest"):
        build_model("cpu", None, offload(), bad)
    assert len(live_models()) == before
    report = verify(bad)
    assert not report.ok and report.files["trunk.safetensors"] == "corrupt"
    assert report.files["experts-000.safetensors"] == "ok"


def test_edited_config_of_a_project_is_caught(project, tmp_path):
    bad = copy(project, tmp_path / "bad")
    set_config(bad, rms_norm_eps=0.5)  # still a valid config: only the digest can tell
    with pytest.raises(CheckpointError, match=r"config\.json does not match the digest"):
        open_checkpoint(bad)


def test_verified_marker_skips_hashing_until_a_file_changes(project, tmp_path, ref_logits):
    ok = copy(project, tmp_path / "ok")
    open_checkpoint(ok)
    assert not (ok / "VERIFIED").exists()  # the expert blobs are checked as a load reads them
    build_model("cpu", None, offload(), ok)
    marker = json.loads((ok / "VERIFIED").read_text())
    assert set(marker["files"]) >= {"trunk.safetensors", "experts-000.safetensors", "config.json"}
    # a flip that keeps size, inode and modification time is not seen by the marker ...
    p = ok / "experts-002.safetensors"
    st = p.stat()
    flip(p, data_start(p) + 5)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    open_checkpoint(ok)
    # ... but by the explicit check, and by any open after a normal write
    assert verify(ok).files["experts-002.safetensors"] == "corrupt"
    flip(p, data_start(p) + 5)  # back to the original bytes, with a new modification time
    (ok / "experts-000.safetensors").touch()
    with torch.no_grad():
        torch.testing.assert_close(build_model("cpu", None, offload(), ok)(IDS).logits, ref_logits, rtol=0, atol=0)


def test_each_blob_is_checked_as_the_load_reads_it(project, tmp_path):
    """A first load checks config, trunk and headers at open and each expert blob against its read-time sum
    as the cache reads it: the corrupt expert is named, no model survives, nothing is marked verified."""
    from mixtral_nb.build import live_models
    from mixtral_nb.cache import ExpertCache

    bad = copy(project, tmp_path / "bad")
    ck = open_checkpoint(bad)
    assert sorted(ck.pending) == [f"experts-{i:03d}.safetensors" for i in range(3)]
    p = bad / "experts-002.safetensors"
    flip(p, p.stat().st_size - 3)  # the last expert of the last layer: read last
    before = len(live_models()), alive(ExpertCache)
    with pytest.raises(CheckpointError, match=r"experts-002\.safetensors \(experts \[1\]\) does not match the digest") as err:
        build_model("cpu", None, offload(), bad)
    # the error is kept (as a notebook keeps the last one), yet the half-built cache is gone
    assert err.value.__traceback__ is not None and (len(live_models()), alive(ExpertCache)) == before
    assert not (bad / "VERIFIED").exists()
    flip(p, p.stat().st_size - 3)
    build_model("cpu", None, offload(), bad)
    assert (bad / "VERIFIED").exists()


def test_a_corrupt_expert_header_is_caught_at_open(project, tmp_path):
    bad = copy(project, tmp_path / "bad")
    p = bad / "experts-000.safetensors"
    raw = bytearray(p.read_bytes())
    i = raw.index(b"blob_checks")
    raw[i] = ord("B")  # still a valid header: only its digest can tell
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"experts-000\.safetensors \(its header\) does not match"):
        open_checkpoint(bad)


def test_a_folder_without_read_sums_is_hashed_whole_before_building(project, tmp_path):
    old = copy(project, tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    del m["read_sums"]
    write_manifest(old, m)
    p = old / "experts-001.safetensors"
    flip(p, data_start(p) + 7)
    with pytest.raises(CheckpointError, match=r"experts-001\.safetensors \(experts \[0\]\) does not match"):
        open_checkpoint(old)


def test_read_time_sum_sees_every_single_bit_flip_and_ignores_threads():
    from mixtral_nb.checkpoint.integrity import fast_digest

    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (3 * 4096 + 13,), dtype=torch.uint8, generator=gen)
    want = fast_digest(data)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fast_digest(data) == want
    finally:
        torch.set_num_threads(threads)
    for pos in torch.randint(0, data.numel(), (200,), generator=gen).tolist():
        for bit in (0, 7):
            bad = data.clone()
            bad[pos] ^= 1 << bit
            assert fast_digest(bad) != want, (pos, bit)
    swapped = data.clone()
    swapped[:4096], swapped[4096:8192] = data[4096:8192].clone(), data[:4096].clone()  # two pages swapped
    assert fast_digest(swapped) != want
    zeroed = data.clone()
    zeroed[4096:8192] = 0  # a page lost
    assert fast_digest(zeroed) != want
    assert fast_digest(data[1:]) != fast_digest(data[:-1])


def test_old_checkpoint_without_digests_gets_them_on_first_open(project, tmp_path, capsys, ref_logits):
    old = copy(project, tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    for key in ("hashes", "blob_hashes", "hash_algo", "read_sums"):
        del m[key]
    (old / "manifest.json").write_text(json.dumps(m, indent=1))
    (old / "COMPLETE").write_text("ok\n")  # what the previous version wrote
    with torch.no_grad():
        torch.testing.assert_close(build_model("cpu", None, offload(), old)(IDS).logits, ref_logits, rtol=0, atol=0)
    assert "has no checksums (written by an earlier version); recording them now" in capsys.readouterr().out
    assert set(json.loads((old / "manifest.json").read_text())["hashes"]) == set(
        json.loads((project / "manifest.json").read_text())["hashes"])
    flip(old / "experts-000.safetensors", data_start(old / "experts-000.safetensors") + 1)
    with pytest.raises(CheckpointError, match="experts-000.safetensors does not match the digest"):
        open_checkpoint(old)
    assert "recording them" not in capsys.readouterr().out


def test_verify_cli_prints_each_file_and_exits_nonzero_on_corruption(project, tmp_path, capsys):
    from mixtral_nb.__main__ import main

    ok = copy(project, tmp_path / "ok")
    assert main(["verify", str(ok), "--time", "--time-load"]) == 0
    out = capsys.readouterr().out
    assert "trunk.safetensors: OK" in out and "experts-002.safetensors: OK" in out and "GB/s" in out
    assert "% of that load" in out
    flip(ok / "experts-002.safetensors", data_start(ok / "experts-002.safetensors") + 9)
    assert main(["verify", str(ok)]) == 1
    out = capsys.readouterr().out
    assert "experts-002.safetensors: CORRUPT" in out and "experts-000.safetensors: OK" in out and "re-create" in out


# ---------------------------------------------------------------------------------------------
# resume fingerprint


def test_resume_refuses_a_source_replaced_by_other_weights_of_the_same_sizes(src, tmp_path):
    source = copy(src, tmp_path / "src")
    dst = tmp_path / "q"

    def stop(layer: int) -> None:
        if layer == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(source, dst, FP16, device="cpu", progress=False, on_layer=stop)
    shutil.rmtree(source)
    write_tiny(source, seed=7, shards=2, **SMALL)  # other weights, identical file sizes
    assert {p.name: p.stat().st_size for p in source.iterdir()} == {p.name: p.stat().st_size for p in src.iterdir()}
    with pytest.raises(CheckpointError, match=r"source's content changed.*mix layers of two different models.*overwrite=True"):
        quantize(source, dst, FP16, device="cpu", progress=False)
    assert not (dst / "COMPLETE").exists()


def test_resume_with_an_unchanged_source_only_stats_it(src, tmp_path, monkeypatch):
    from mixtral_nb.checkpoint import integrity

    dst = tmp_path / "q"

    def stop(layer: int) -> None:
        if layer == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(src, dst, FP16, device="cpu", progress=False, on_layer=stop)
    hashed: list[str] = []
    real = integrity.digest_files
    monkeypatch.setattr(integrity, "digest_files", lambda folder, names, **kw: hashed.extend(names) or real(folder, names, **kw))
    quantize(src, dst, FP16, device="cpu", progress=False)
    assert hashed == []  # the source's digests came from the stat-keyed memo
    assert (dst / "COMPLETE").exists()


# ---------------------------------------------------------------------------------------------
# structure


def test_config_with_fewer_layers_than_the_weights_is_refused(src, tmp_path):
    bad = copy(src, tmp_path / "bad")
    set_config(bad, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"weights hold layer 2 but config\.json says num_hidden_layers=2"):
        quantize(bad, tmp_path / "q", FP16, progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("value", [0, -1, 10**8, 2.0, "3", None, True])
def test_layer_count_out_of_bounds_is_refused_up_front(src, tmp_path, value):
    bad = copy(src, tmp_path / "bad")
    set_config(bad, num_hidden_layers=value)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers is .* expected an integer between 1 and 1024"):
        quantize(bad, tmp_path / "q", FP16, progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("fields, message", [
    ({"dtype": "bogus"}, r"dtype is 'bogus', expected one of float32"),
    ({"num_experts_per_tok": 3}, r"num_experts_per_tok=3 \(top-k\) exceeds num_local_experts=2"),
    ({"hidden_act": 5}, r"hidden_act is 5"),
    ({"rms_norm_eps": "small"}, r"rms_norm_eps is 'small'"),
])
def test_bad_config_fields_are_checkpoint_errors(src, tmp_path, fields, message):
    bad = copy(src, tmp_path / "bad")
    set_config(bad, **fields)
    with pytest.raises(CheckpointError, match=message):
        build_model("cpu", FP16, offload(), bad)


def test_directories_where_files_belong(src, project, tmp_path):
    bad = copy(src, tmp_path / "bad")
    shard = bad / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors is a folder"):
        quantize(bad, tmp_path / "q", FP16, progress=False)
    bad2 = copy(src, tmp_path / "bad2")
    (bad2 / "config.json").unlink()
    (bad2 / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is a folder, not a file"):
        open_checkpoint(bad2)
    with pytest.raises(CheckpointError, match=r"is a file, not a checkpoint folder"):
        build_model("cpu", None, offload(), project / "config.json")
    with pytest.raises(CheckpointError, match=r"is a folder, not a safetensors file"):
        read_header(tmp_path)


@pytest.mark.parametrize("field, value", [("version", "1"), ("version", None), ("files", ["trunk.safetensors"]),
                                          ("files", {"trunk.safetensors": "big"}), ("quant", 3), ("attn_specs", [])])
def test_manifest_fields_of_the_wrong_type(project, tmp_path, field, value):
    bad = copy(project, tmp_path / "bad")
    m = json.loads((bad / "manifest.json").read_text())
    m[field] = value
    write_manifest(bad, m)
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        open_checkpoint(bad)


# ---------------------------------------------------------------------------------------------
# the writer's lock


def test_a_second_writer_is_refused_while_the_first_runs(src, tmp_path):
    dst = tmp_path / "q"
    dst.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (dst / ".mixtral_nb.lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename,
                                                          "what": "writing"}))
        with pytest.raises(CheckpointError, match=rf"being written by process {other.pid}.*wait for it to finish.*delete"):
            quantize(src, dst, FP16, device="cpu", progress=False)
        assert not (dst / "progress.json").exists()
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over(src, tmp_path, capsys):
    dst = tmp_path / "q"
    dst.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (dst / ".mixtral_nb.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    quantize(src, dst, FP16, device="cpu", progress=False)
    assert f"left by process {dead.pid}, which no longer runs; taking it over" in capsys.readouterr().out
    assert (dst / "COMPLETE").exists() and not (dst / ".mixtral_nb.lock").exists()


def test_two_concurrent_quantize_calls_into_one_folder(src, tmp_path):
    """A real second process while the first holds the lock: one clear error, the first finishes."""
    dst = tmp_path / "q"
    script = ("import sys, time; from mixtral_nb.checkpoint import quantize; from mixtral_nb.config import QuantConfig\n"
              "def slow(layer): print('layer', layer, flush=True); time.sleep(3)\n"
              "quantize(sys.argv[1], sys.argv[2], QuantConfig(None, None), device='cpu', progress=False, on_layer=slow)\n")
    first = subprocess.Popen([sys.executable, "-c", script, str(src), str(dst)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        assert first.stdout.readline().startswith("layer 0")
        with pytest.raises(CheckpointError, match=rf"being written by process {first.pid}"):
            quantize(src, dst, FP16, device="cpu", progress=False)
    finally:
        first.communicate(timeout=120)
    assert first.returncode == 0 and (dst / "COMPLETE").exists()
    open_checkpoint(dst)


def test_verify_compares_a_downloaded_original_with_the_hub_digests(src, tmp_path, capsys):
    """huggingface_hub records each file's etag (sha256 for LFS files, the git blob id for small ones)
    in ``.cache/huggingface/download/<name>.metadata``; verify compares the files with them."""
    import hashlib

    from mixtral_nb.__main__ import main

    folder = copy(src, tmp_path / "hf")
    meta = folder / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    for p in folder.glob("*.safetensors"):
        (meta / f"{p.name}.metadata").write_text(f"{'0' * 40}\n{hashlib.sha256(p.read_bytes()).hexdigest()}\n1.0\n")
    cfg = (folder / "config.json").read_bytes()
    blob_id = hashlib.sha1(f"blob {len(cfg)}\0".encode() + cfg).hexdigest()
    (meta / "config.json.metadata").write_text(f"{'0' * 40}\n{blob_id}\n1.0\n")
    report = verify(folder)
    assert report.ok and set(report.files.values()) == {"ok"} and len(report.files) == 3
    shard = folder / "model-00002-of-00002.safetensors"
    flip(shard, data_start(shard) + 3)
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "model-00002-of-00002.safetensors: CORRUPT" in out and "config.json: OK" in out and "download them again" in out
