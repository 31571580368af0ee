"""The Colab rehearsal on CPU at toy size (its GPU run is scripts/gpu_rehearse.sh), and the second
build of one checkpoint releasing the first (a re-run notebook cell)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import psutil
import pytest
import torch

from mixtral_nb.decoder import Decoder, DecoderConfig

import test_article
from mixtral_nb import OffloadConfig, QuantConfig
from mixtral_nb.build import ReleasedModelError, build_model, live_models, model_bytes, on_release
from mixtral_nb.chat import ChatSession
from mixtral_nb.tokenizer import mixtral_tokenizer
from mixtral_nb.rehearse import rehearse_main, rehearse_notebook
from mixtral_nb.tiny import write_tiny

STAGES = ["convert", "plan", "build", "chat", "stop", "regenerate", "overflow", "rebuild", "rechat"]


@pytest.fixture(scope="module")
def article(tmp_path_factory) -> Path:
    """A tiny folder in the article's layout with Mixtral's vocabulary (the tokenizer is the real one)."""
    folder = tmp_path_factory.mktemp("rehearse") / "article"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_article, "V", 32000)
        test_article.write_article(folder, 2)
    return folder


@pytest.mark.timeout(300)
def test_rehearsal_on_cpu_runs_every_stage_and_reports(article, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = rehearse_main(["--article", str(article), "--device", "cpu", "--new-tokens", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "stage" in printed and "peak RSS GB" in printed and "peak pinned GB" in printed and "disk GB written" in printed
    assert "tok/s" in printed and "time to first token" in printed and "expert-cache hit rate" in printed
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert [s["name"] for s in report["stages"]] == STAGES
    for s in report["stages"]:
        assert s["wall_s"] >= 0 and s["peak_rss_gb"] > 0.05 and s["peak_host_gb"] >= s["peak_rss_gb"]
        assert s["peak_vram_mib"] is None and s["error"] is None  # CPU: no VRAM
    by = {s["name"]: s for s in report["stages"]}
    assert [t["tokens"] for t in by["chat"]["info"]["turns"]] == [8, 8, 8]  # every reply runs to its length
    assert by["stop"]["info"]["stop_reason"] == "stop" and by["stop"]["info"]["tokens"] < 8
    assert by["regenerate"]["info"]["tokens"] == 8
    assert by["overflow"]["info"]["trimmed"] > 0
    assert by["rechat"]["info"]["old_session"].startswith("ReleasedModelError")
    assert by["rechat"]["info"]["turn"]["tokens"] == 8
    assert by["convert"]["disk_written_gb"] > 0  # the converted copy
    chat = report["chat"]
    assert chat["tok_s"] > 0 and chat["ttft_s"] > 0 and 0 <= chat["expert_cache_hit_rate"] <= 1
    assert report["rebuild_vs_build"]["host"] < 1.25


def test_host_limit_crossing_fails_naming_the_stage_and_limit(article, capsys):
    code = rehearse_main(["--article", str(article), "--device", "cpu", "--new-tokens", "8", "--host-limit-gb", "0.001"])
    captured = capsys.readouterr()
    assert code == 2
    assert "host memory crossed the limit of 0.001 GB" in captured.err and "during stage 'convert'" in captured.err


def test_bad_arguments_fail_before_work(article, capsys):
    assert rehearse_main(["--article", str(article.parent / "missing"), "--device", "cpu"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert rehearse_main(["--article", str(article), "--device", "cpu", "--new-tokens", "2"]) == 1
    assert "--new-tokens must be at least 4" in capsys.readouterr().err


def _rss() -> int:
    """RSS of live memory: freed heap blocks handed back to the OS first (glibc), so allocator slack is not counted."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


def test_second_build_of_a_checkpoint_releases_the_first(tmp_path):
    """A notebook's load cell run twice: ``model = build_model(...)`` while the old model is still bound."""
    folder = write_tiny(tmp_path / "m", layers=4, experts=8, hidden=256, intermediate=1024, vocab=32000)
    off = lambda: OffloadConfig(main_size=4 * 6, offload_size=4 * 2, buffer_size=2, offload_per_layer=2,  # noqa: E731
                                prefetch=1)
    model = build_model("cpu", QuantConfig(None, None), off(), folder)
    one = sum(model_bytes(model).values())
    assert one > 150e6
    tok = mixtral_tokenizer(cache_dir=tmp_path / "tok")
    old_session = ChatSession(model, tok, max_new_tokens=4)
    old_session.send("Hello")
    decoder = Decoder(model, DecoderConfig(max_len=64))
    before = _rss()
    first = model
    model = build_model("cpu", QuantConfig(None, None), off(), folder)
    grew = _rss() - before
    assert live_models() == [model]
    assert sum(sum(model_bytes(m).values()) for m in live_models()) == one  # not two copies
    assert grew < 0.4 * one, f"RSS grew by {grew / 1e6:.0f} MB on the second build of a {one / 1e6:.0f} MB model"
    assert first.mixtral_nb_released and sum(model_bytes(first).values()) == 0
    assert decoder.k == [] and decoder.v == []  # a Decoder built on the old model freed its KV cache too
    with pytest.raises(ReleasedModelError, match="build_model was called again"):
        first(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ReleasedModelError, match="use the new model"):
        old_session.send("Still there?")
    assert first.expert_cache.stats() == {}  # a monitor still sampling the old model keeps running
    session = ChatSession(model, tok, max_new_tokens=4)
    assert session.send("Hello") == old_session.history[1]["content"]  # same weights, same greedy reply


def test_keep_previous_keeps_both_and_other_checkpoints_stay(tmp_path):
    a = write_tiny(tmp_path / "a", layers=2, experts=4)
    b = write_tiny(tmp_path / "b", layers=2, experts=4, seed=1)
    off = lambda: OffloadConfig(main_size=2 * 4, offload_size=0, buffer_size=1, offload_per_layer=0)  # noqa: E731
    ids = torch.tensor([[1, 2, 3]])
    m1 = build_model("cpu", QuantConfig(None, None), off(), a)
    m2 = build_model("cpu", QuantConfig(None, None), off(), a, keep_previous=True)
    m3 = build_model("cpu", QuantConfig(None, None), off(), b)  # another checkpoint: a comparison, not a re-run
    for m in (m1, m2, m3):
        assert m(input_ids=ids).logits.isfinite().all()
    m1_logits = m1(input_ids=ids).logits

    class Engine:  # something built on m1 with memory of its own (a Decoder's KV cache)
        freed = False

        def free(self) -> None:
            self.freed = True

    engine = Engine()
    on_release(m1, engine.free)
    m4 = build_model("cpu", QuantConfig(None, None), off(), a)
    assert m1.mixtral_nb_released and m2.mixtral_nb_released and not getattr(m3, "mixtral_nb_released", False)
    assert engine.freed
    torch.testing.assert_close(m4(input_ids=ids).logits, m1_logits)
    with pytest.raises(ReleasedModelError):
        m2(input_ids=ids)


@pytest.mark.timeout(600)
def test_walkthrough_notebook_runs_against_a_local_folder_with_the_widget_driven(article, tmp_path):
    result = rehearse_notebook(article, device="cpu", new_tokens=8, out=tmp_path / "walkthrough.ipynb")
    widget = result["widget"]
    n = widget["max_new_tokens"]  # the widget's slider starts at the notebook's value
    assert n >= 8 and widget["send"]["tokens"] == n
    assert widget["stop"]["stop_reason"] == "stop" and widget["stop"]["tokens"] < n
    assert widget["regenerate"]["tokens"] == n
    assert all(c["wall_s"] is not None and not c["error"] for c in result["cells"])
    sources = [c["first_line"] for c in result["cells"]]
    assert sources[-1].startswith("# rehearsal: drive the chat widget")


def test_an_error_inside_a_stage_names_the_stage(article, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(article, bad)
    next(iter(sorted(bad.glob("model-*.safetensors")))).unlink()  # an incomplete download
    out = tmp_path / "r.json"
    assert rehearse_main(["--article", str(bad), "--device", "cpu", "--json", str(out)]) == 1
    assert "stage 'convert' failed: CheckpointError" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["stages"][-1]["name"] == "convert" and report["stages"][-1]["error"]
