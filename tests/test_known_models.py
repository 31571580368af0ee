"""The full-size configs of every known MoE model, and the planner's verdict for each on each preset.

The configs are only dimensions; each is held to its model card's parameter count (so a wrong width
or count fails), counted from the model transformers builds on the meta device. Nothing here
allocates a full-size tensor.
"""

from __future__ import annotations

import json

import pytest

from mixtral_nb.__main__ import MODELS_LEGEND
from mixtral_nb.config import article_quant_config
from mixtral_nb.families import FAMILIES, family_of, kv_bytes_per_token, skeleton, trunk_bytes
from mixtral_nb.known_models import KNOWN_MODELS, PUBLISHED_PARAMS, known_config, model_config, param_count
from mixtral_nb.planner import PRESETS, MemoryPlanError, ModelSizes, family_sizes, plan, preset

from test_cli import assert_one_line_error, call


@pytest.mark.parametrize("name", list(KNOWN_MODELS))
def test_config_matches_the_published_parameter_count(name):
    config = model_config(name)
    assert config.model_type == KNOWN_MODELS[name]["model_type"] and config.model_type in FAMILIES
    assert type(config).__name__ == FAMILIES[config.model_type].config_class
    total = param_count(config)
    assert abs(total / PUBLISHED_PARAMS[name] - 1) < 0.02, f"{name}: {total / 1e9:.2f}B parameters"


def test_parameter_count_reads_the_config():
    """Not a table lookup: one expert more per layer adds its three matrices and one router row."""
    base = model_config("olmoe-1b-7b")
    more = model_config({**known_config("olmoe-1b-7b"), "num_experts": 65})
    sk = skeleton(base)
    assert param_count(more) - param_count(base) == len(sk.moe_layers) * (3 * sk.intermediate + 1) * sk.hidden


def test_unknown_model_name_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'mixtral-8x9b'.*qwen3-30b-a3b"):
        known_config("mixtral-8x9b")
    with pytest.raises(ValueError, match="qwen3-30b-a3b"):
        ModelSizes.of("mixtral-8x9b")


def test_mixtral_sizes_do_not_move():
    """Mixtral keeps the planner's own arithmetic: the named config gives the figures it always had."""
    assert family_sizes(model_config("mixtral-8x7b")) == ModelSizes.of("mixtral-8x7b") == ModelSizes.of()
    assert preset("colab-t4", model="mixtral-8x7b") == preset("colab-t4")


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite", "phi-3.5-moe", "qwen1.5-moe-a2.7b"])
def test_family_sizes_count_from_the_config(name):
    """Other families: MoE layers and routed experts from the skeleton, the resident rest exactly as
    build_model holds it, the KV cache at the family's own head widths (MLA's 192 + 128 per head)."""
    config = model_config(name)
    s, sk = ModelSizes.of(name), skeleton(config)
    assert (s.num_layers, s.num_experts, s.hidden, s.intermediate) == (len(sk.moe_layers), sk.num_experts, sk.hidden,
                                                                        sk.intermediate)
    assert s.trunk_bytes == trunk_bytes(config, article_quant_config().attn)
    assert s.kv_bytes_per_token == kv_bytes_per_token(config)
    if name == "deepseek-v2-lite":
        assert s.kv_bytes_per_token == 27 * 16 * (192 + 128) * 2 and s.num_layers == 26  # one dense layer
    if name == "qwen3-30b-a3b":
        assert s.kv_bytes_per_token == 48 * 4 * 256 * 2  # head_dim 128, not hidden / heads = 64


def test_verdicts_that_can_fail():
    """Mixtral-8x22B does not fit a free Colab; Mixtral-8x7B and Phi-3.5-MoE do, with offloading."""
    with pytest.raises(MemoryPlanError):
        preset("colab-t4", model="mixtral-8x22b")
    for name in ("mixtral-8x7b", "phi-3.5-moe"):
        p = preset("colab-t4", model=name)
        assert 0 < p.offload_per_layer < p.sizes.num_experts and not p.host_mirror
    assert preset("a100-80gb", model="mixtral-8x22b").offload_per_layer == 0


def _rows(out: str) -> dict[str, dict[str, str]]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_plan_all_models_on_all_presets(capsys):
    rc, out, err = call(capsys, "plan", "--model", "all", "--all")
    assert rc == 0, err
    rows = _rows(out)
    assert list(rows) == list(KNOWN_MODELS)
    assert MODELS_LEGEND in out
    for name, row in rows.items():
        assert set(PRESETS) <= set(row), row
        sizes = ModelSizes.of(name)
        assert row["GB"] == f"{(sizes.num_layers * sizes.num_experts * sizes.expert_bytes + sizes.trunk_bytes) / 1e9:.1f}"
        assert row["routed experts"].endswith(f"top-{skeleton(model_config(name)).top_k}")
        for p in PRESETS:
            try:
                got = preset(p, model=name)
            except MemoryPlanError:
                assert row[p] == "no", (name, p)
                continue
            assert row[p] != "no", (name, p)
            if got.device == "cuda" and got.offload_per_layer:
                assert row[p].startswith(f"{sum(got.layer_slots())}/{sizes.num_layers * sizes.num_experts} ")
    assert rows["mixtral-8x22b"]["colab-t4"] == "no" and rows["mixtral-8x7b"]["colab-t4"] != "no"
    assert rows["mixtral-8x22b"]["cpu"] == "no" and rows["olmoe-1b-7b"]["cpu"] == "yes"


def test_plan_one_model_one_preset_and_a_folder(capsys, tmp_path):
    rc, out, err = call(capsys, "plan", "--model", "qwen3-30b-a3b", "--preset", "12gb")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert "Qwen3MoeForCausalLM" in lines[0] and "48 MoE layers x 128" in lines[0]
    assert lines[-1].startswith("12gb ") and f" {preset('12gb', model='qwen3-30b-a3b').offload_per_layer} " in lines[-1]
    rc, out, _ = call(capsys, "plan", "--model", "all", "--preset", "colab-t4")
    assert rc == 0 and "colab-t4" in out.splitlines()[0] and "a100-80gb" not in out
    (tmp_path / "config.json").write_text(json.dumps(known_config("deepseek-v2-lite")))
    rc, out, err = call(capsys, "plan", "--model", str(tmp_path), "--preset", "cpu")
    assert rc == 0, err
    assert "DeepseekV2ForCausalLM" in out and out.strip().splitlines()[-1].rstrip().endswith("yes")


def test_plan_bad_model_is_one_line_naming_the_choices(capsys, tmp_path):
    rc, _, err = call(capsys, "plan", "--model", "qwen3-31b", "--all")
    assert_one_line_error(rc, err, "'qwen3-31b'", *KNOWN_MODELS, "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, _, err = call(capsys, "plan", "--model", str(tmp_path), "--all")
    assert_one_line_error(rc, err, "'llama'", "qwen3_moe")


def test_plan_for_a_family_config_object_and_dict_agree():
    config = model_config("phi-3.5-moe")
    assert family_of(config).model_type == "phimoe"
    a = plan(15 * 2 ** 30, 12 * 10 ** 9, model=config)
    b = plan(15 * 2 ** 30, 12 * 10 ** 9, model=known_config("phi-3.5-moe"))
    c = plan(15 * 2 ** 30, 12 * 10 ** 9, model="phi-3.5-moe")
    assert a.sizes == b.sizes == c.sizes and a.layer_slots() == c.layer_slots()


def test_readme_shows_the_planner_table_as_it_prints(capsys):
    """README's "Other MoE models" table is the real output of `plan --model all --all`."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Other MoE models", 1)[1].split("\n## ", 1)[0]
    rc, out, _ = call(capsys, "plan", "--model", "all", "--all")
    assert rc == 0
    printed = [line for line in out.splitlines() if line.startswith("|")]
    assert printed and "\n".join(printed) in section
