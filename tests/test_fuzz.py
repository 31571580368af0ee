"""Fuzz tier: random corruptions of a tiny project checkpoint end in a clear error, never in another
exception type and never in a silent load with different weights.

Two kinds of damage: what a disk or a copy does (byte flips in headers and data, truncation, edits
of the JSON files) must be an error or leave the logits bit-identical; what a person or a tool
writing a consistent but wrong folder does (JSON edits with the digests updated to match) must be
a CheckpointError, ValueError or MemoryPlanError, or a model that runs. Deterministic
(``derandomize``), so a failure reproduces; about 40 s on two cores.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtral_nb import CheckpointError, MemoryPlanError, OffloadConfig, QuantConfig, build_model, quantize
from mixtral_nb.checkpoint.integrity import bytes_digest, digest_files
from mixtral_nb.tiny import write_tiny

L, E = 2, 2
IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])
ALLOWED = (CheckpointError, ValueError, MemoryPlanError)
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# config fields the structural checks own (a consistent edit of any other field is a different, valid model)
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
               "hidden_act", "dtype", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "head_dim", "sliding_window",
               "model_type", "architectures", "router_jitter_noise", "use_cache", "output_router_logits"]


def offload() -> OffloadConfig:
    return OffloadConfig(main_size=L * (E - 1), offload_size=L, buffer_size=1, offload_per_layer=1, prefetch=0)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("fuzz")
    src = write_tiny(root / "src", seed=3, layers=L, experts=E, hidden=32, intermediate=64, vocab=64)
    q = quantize(src, root / "q", QuantConfig(None, None), device="cpu", progress=False)
    with torch.no_grad():
        ref = build_model("cpu", None, offload(), q)(IDS).logits
    return q, ref


def load(folder: Path) -> torch.Tensor | None:
    """Logits of the folder's model, or None when loading refused it with an allowed error."""
    try:
        model = build_model("cpu", None, offload(), folder)
    except ALLOWED:
        return None
    with torch.no_grad():
        return model(IDS).logits


def scratch(pristine_folder: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="fuzz-")) / "q"
    shutil.copytree(pristine_folder, dst, ignore=shutil.ignore_patterns("VERIFIED"))
    return dst


def files_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def rehash(folder: Path) -> None:
    """Make the digests agree with the files again (a consistent folder, as a buggy writer leaves it)."""
    m = json.loads((folder / "manifest.json").read_text())
    if isinstance(m, dict) and isinstance(m.get("hashes"), dict):
        m["hashes"] = digest_files(folder, [n for n in m["hashes"] if (folder / n).is_file()]).digests
    text = json.dumps(m)
    (folder / "manifest.json").write_text(text)
    (folder / "COMPLETE").write_text(json.dumps({"manifest": bytes_digest(text.encode())}))


def edit_json(data: st.DataObject, path: Path, keys: list[str] | None = None) -> None:
    obj = json.loads(path.read_text())
    key = data.draw(st.sampled_from(keys or sorted(obj)), label="key")
    target, leaf = obj, key
    if isinstance(obj.get(key), dict) and obj[key] and data.draw(st.booleans(), label="nested"):
        target, leaf = obj[key], data.draw(st.sampled_from(sorted(obj[key])), label="subkey")
    if data.draw(st.booleans(), label="delete") and leaf in target:
        del target[leaf]
    else:
        target[leaf] = data.draw(JSON_VALUES, label="value")
    path.write_text(json.dumps(obj))


@FUZZ
@given(data=st.data())
def test_byte_damage_is_an_error_or_changes_nothing(pristine, data):
    folder, ref = pristine
    bad = scratch(folder)
    try:
        name = data.draw(st.sampled_from(files_of(bad)), label="file")
        p = bad / name
        raw = bytearray(p.read_bytes())
        if data.draw(st.booleans(), label="truncate") or not raw:
            raw = raw[:data.draw(st.integers(0, max(0, len(raw) - 1)), label="length")]
        else:
            head = 8 + int.from_bytes(raw[:8], "little") if name.endswith(".safetensors") else len(raw)
            region = data.draw(st.sampled_from(["header", "data"]), label="region")
            lo, hi = (0, min(head, len(raw))) if region == "header" or head >= len(raw) else (head, len(raw))
            for _ in range(data.draw(st.integers(1, 4), label="flips")):
                i = data.draw(st.integers(lo, hi - 1), label="offset")
                raw[i] ^= data.draw(st.integers(1, 255), label="xor")
        p.write_bytes(bytes(raw))
        got = load(bad)
        if got is not None:
            assert torch.equal(got, ref), f"{name} damaged, loaded without error, different logits"
    finally:
        shutil.rmtree(bad.parent)


@FUZZ
@given(data=st.data())
def test_json_edits_are_an_error_or_change_nothing(pristine, data):
    folder, ref = pristine
    bad = scratch(folder)
    try:
        name = data.draw(st.sampled_from(["manifest.json", "config.json", "COMPLETE", "progress.json"]), label="file")
        p = bad / name
        if name == "COMPLETE":
            p.write_text(data.draw(st.sampled_from(["", "ok\n", "{}", '{"manifest": 3}', "\xff"]), label="text"))
        else:
            edit_json(data, p)
        got = load(bad)
        if got is not None:
            assert torch.equal(got, ref), f"{name} edited, loaded without error, different logits"
    finally:
        shutil.rmtree(bad.parent)


@FUZZ
@given(data=st.data())
def test_consistent_but_wrong_json_is_a_clear_error(pristine, data):
    folder, _ = pristine
    bad = scratch(folder)
    try:
        name = data.draw(st.sampled_from(["manifest.json", "config.json"]), label="file")
        edit_json(data, bad / name, CONFIG_KEYS if name == "config.json" else None)
        rehash(bad)
        got = load(bad)  # any other exception type fails the test
        assert got is None or got.shape == (1, IDS.shape[1], got.shape[-1])
    finally:
        shutil.rmtree(bad.parent)
