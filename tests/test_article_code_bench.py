"""scripts/article_code_bench.py's checks, which run before any GPU work: arguments, the folder's layout, the
offline config it serves the article's code, and its one-line errors (the timing itself needs CUDA and the
article's own environment; BENCHMARKS.md records those runs)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mixtral_nb.synthetic import write_article_checkpoint
from mixtral_nb.tiny import tiny_config



@pytest.fixture(scope="module")
def acb(script):
    return script("article_code_bench")


@pytest.fixture(scope="module")
def article_dir(tmp_path_factory):
    cfg = tiny_config(layers=2, experts=4, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=256)
    return write_article_checkpoint(tmp_path_factory.mktemp("art") / "a", config=cfg, seed=2)


def test_arguments_are_checked(acb, capsys):
    args = acb.parse_args(["--folder", "x"])
    assert (args.offload_per_layer, args.vram_cap_mib, args.prompt_len, args.new_tokens) == (4, 15095, 128, 64)
    for bad, what in ((["--repeat", "0"], "--repeat must be at least 1"),
                      (["--offload-per-layer", "-1"], "--offload-per-layer must be at least 0"),
                      (["--vram-cap-mib", "-5"], "--vram-cap-mib must be at least 0")):
        with pytest.raises(SystemExit) as e:
            acb.parse_args(["--folder", "x", *bad])
        assert e.value.code == 2 and what in capsys.readouterr().err


def test_layout_of_the_article_folder_is_accepted(acb, article_dir):
    config = acb.check_layout(article_dir)
    assert config["model_type"] == "mixtral" and config["num_hidden_layers"] == 2


def test_a_folder_not_in_the_article_layout_is_one_clear_error(acb, article_dir, tmp_path):
    with pytest.raises(acb.BenchError, match="does not exist"):
        acb.check_layout(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(article_dir, broken)
    index = json.loads((broken / acb.INDEX).read_text())
    expert_file = index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w1.W_q"]
    (broken / expert_file).unlink()
    with pytest.raises(acb.BenchError, match=r"expert 1\.3\) is missing"):
        acb.check_layout(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(acb.BenchError, match="model_type 'llama', not 'mixtral'"):
        acb.check_layout(broken)


def test_the_config_is_served_offline_under_the_hub_name(acb, article_dir, tmp_path, monkeypatch):
    for var in ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test
    config = acb.check_layout(article_dir)
    acb.serve_hub_config(config, tmp_path / "hub")
    assert os.environ["HF_HOME"] == str(tmp_path / "hub") and os.environ["HF_HUB_OFFLINE"] == "1"
    snaps = list((tmp_path / "hub" / "hub" / "models--mistralai--Mixtral-8x7B-Instruct-v0.1" / "snapshots").iterdir())
    assert len(snaps) == 1 and json.loads((snaps[0] / "config.json").read_text()) == config


def test_without_cuda_it_stops_with_one_line_and_a_json_error(acb, article_dir, tmp_path, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU run is the real check")
    out = tmp_path / "r.json"
    assert acb.main(["--folder", str(article_dir), "--article-src", str(tmp_path), "--json", str(out)]) == 2
    assert "src/build_model.py is missing" in capsys.readouterr().err
    src = tmp_path / "src"
    src.mkdir()
    (src / "build_model.py").write_text("")
    assert acb.main(["--folder", str(article_dir), "--article-src", str(tmp_path), "--json", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert "no CUDA device" in json.loads(out.read_text())["error"]
