"""Settings: OffloadConfig/QuantConfig refuse bad values with one clear ValueError, derive their sizes,
are never mutated by callers; build_model's device check; tokens never reach a repr or a log line."""

from __future__ import annotations

import dataclasses
import io
import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtral_nb import OffloadConfig, QuantConfig, build_model
from mixtral_nb.build import parse_devices
from mixtral_nb.config import article_quant_config
from mixtral_nb.planner import MemoryPlanError, ModelSizes, check_fits, plan, preset
from mixtral_nb.tiny import write_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INT_FIELDS = ("main_size", "offload_size", "buffer_size", "offload_per_layer", "prefetch", "extra_host_slots",
              "clean_window")
ARTICLE = {"main_size": 32 * (8 - 4), "offload_size": 32 * 4, "buffer_size": 4, "offload_per_layer": 4}


def hqq(nbits=2, group_size=16, axis=1, scale=128, zero=None, **weight):
    return {"weight_quant_params": {"nbits": nbits, "group_size": group_size, "axis": axis, **weight},
            "scale_quant_params": {"nbits": 8, "group_size": scale}, "zero_quant_params": {"nbits": 8, "group_size": zero}}


# --------------------------------------------------------------------------------------- OffloadConfig


def test_article_config_still_works_and_is_frozen():
    cfg = OffloadConfig(main_size=32 * (8 - 4), offload_size=32 * 4, buffer_size=4, offload_per_layer=4)
    assert cfg == OffloadConfig.for_model(32, 8, offload_per_layer=4, buffer_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.main_size = 0  # type: ignore[misc]
    changed = dataclasses.replace(cfg, prefetch=0)
    assert changed.prefetch == 0 and cfg.prefetch == 2


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("bad", ["4", 4.0, 2.5, True, None, [4]])
def test_every_int_field_refuses_other_types(field, bad):
    with pytest.raises(ValueError, match=rf"OffloadConfig\.{field} must be an int, got {__import__('re').escape(repr(bad))}"):
        OffloadConfig(**{**ARTICLE, field: bad})


def test_type_errors_suggest_the_fix():
    with pytest.raises(ValueError, match=r"buffer_size must be an int, got '4' \(str\): use buffer_size=4"):
        OffloadConfig(**{**ARTICLE, "buffer_size": "4"})
    with pytest.raises(ValueError, match=r"prefetch must be an int, got 1.0 \(float\): use prefetch=1"):
        OffloadConfig(**{**ARTICLE, "prefetch": 1.0})


@pytest.mark.parametrize("field,bad", [("main_size", 0), ("offload_size", -1), ("buffer_size", 0),
                                       ("offload_per_layer", -1), ("prefetch", -2), ("extra_host_slots", -1),
                                       ("clean_window", 0), ("buffer_size", 1 << 40)])
def test_every_int_field_has_a_range(field, bad):
    with pytest.raises(ValueError, match=rf"OffloadConfig\.{field} must be between .*, got {bad}"):
        OffloadConfig(**{**ARTICLE, field: bad})


@pytest.mark.parametrize("field,bad", [("host_mirror", "yes"), ("host_mirror", 1), ("pin_memory", None),
                                       ("pin_memory", 0), ("pin_memory", "False")])
def test_switches_must_be_bools(field, bad):
    with pytest.raises(ValueError, match=rf"OffloadConfig\.{field} must be True"):
        OffloadConfig(**{**ARTICLE, field: bad})


def test_numpy_ints_become_plain_ints():
    np = pytest.importorskip("numpy")
    cfg = OffloadConfig(**{**ARTICLE, "buffer_size": np.int64(3)})
    assert cfg.buffer_size == 3 and type(cfg.buffer_size) is int


def test_for_model_derives_sizes_and_refuses_too_many_offloaded():
    cfg = OffloadConfig.for_model(2, 4, offload_per_layer=1, buffer_size=1, prefetch=0)
    assert (cfg.main_size, cfg.offload_size, cfg.offload_per_layer) == (6, 2, 1)
    assert OffloadConfig.for_model(3, 8, offload_per_layer=0).offload_size == 0
    with pytest.raises(ValueError, match=r"offload_per_layer must be between 0 and 7 \(a layer of 8 experts needs"):
        OffloadConfig.for_model(32, 8, offload_per_layer=8)
    with pytest.raises(ValueError, match="for_model derives main_size"):
        OffloadConfig.for_model(32, 8, main_size=3)
    with pytest.raises(ValueError, match="num_layers must be an int"):
        OffloadConfig.for_model("32", 8)


def test_sizes_must_hold_the_model():
    with pytest.raises(ValueError, match=r"offload_size=0 is smaller than offload_per_layer=4"):
        OffloadConfig(main_size=128, offload_size=0, offload_per_layer=4)
    cfg = OffloadConfig(main_size=100, offload_size=128, offload_per_layer=4)
    with pytest.raises(ValueError, match=r"is too small for a model of 32 layers x 8 experts .* use main_size=128"):
        cfg.check_model(32, 8)
    with pytest.raises(ValueError, match=r"offload_size=64\) is too small .* offload_size=128 \(32 x 4\)"):
        OffloadConfig(main_size=128, offload_size=64, offload_per_layer=4).check_model(32, 8)
    OffloadConfig(**ARTICLE).check_model(4, 8)  # the article's numbers also build a 4-layer test model
    with pytest.raises(ValueError, match=r"offload_per_layer=8 leaves no GPU slot .* use at most 7"):
        OffloadConfig(main_size=1, offload_size=256, offload_per_layer=8).check_model(32, 8)
    OffloadConfig(**ARTICLE).check_model(32, 8)


def test_build_model_refuses_sizes_of_another_model_before_building(tmp_path):
    src = write_tiny(tmp_path / "m", layers=2, experts=4, hidden=64, intermediate=128)
    wrong = OffloadConfig(main_size=3, offload_size=4, offload_per_layer=2)  # 2 layers x 2 GPU slots need 4
    with pytest.raises(ValueError, match=r"too small for a model of 2 layers x 4 experts at offload_per_layer=2: "
                                         r"use main_size=4 \(2 x 2\), offload_size=4"):
        build_model("cpu", None, wrong, src)
    with pytest.raises(ValueError, match=r"offload_per_layer=4 leaves no GPU slot for a layer of 4 experts"):
        build_model("cpu", None, OffloadConfig(**ARTICLE), src)
    with pytest.raises(ValueError, match="offload_config must be an OffloadConfig, got dict"):
        build_model("cpu", None, dict(ARTICLE), src)
    with pytest.raises(ValueError, match="quant_config must be a QuantConfig or None, got dict"):
        build_model("cpu", hqq(), OffloadConfig.for_model(2, 4, offload_per_layer=1), src)
    cfg = OffloadConfig.for_model(2, 4, offload_per_layer=1, buffer_size=1, prefetch=0)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype or None, got 'float16'"):
        build_model("cpu", None, cfg, src, dtype="float16")
    with pytest.raises(ValueError, match="host_mirror must be True, False or None, got 'no'"):
        build_model("cpu", None, cfg, src, host_mirror="no")
    before = dataclasses.asdict(cfg)
    build_model("cpu", None, cfg, src)
    assert dataclasses.asdict(cfg) == before


def test_plan_offload_config_is_derived():
    p = preset("colab-t4")
    cfg = p.offload_config()
    cfg.check_model(32, 8)
    assert cfg.offload_per_layer == p.offload_per_layer and cfg.buffer_size == p.buffer_size


# --------------------------------------------------------------------------------------- QuantConfig


@pytest.mark.parametrize("cfg,message", [
    (hqq(nbits=2.7), r"\['nbits'\]=2.7 is not supported: use one of 1, 2, 3, 4, 8"),
    (hqq(nbits=2.0), r"\['nbits'\]=2.0 is not supported"),
    (hqq(nbits="2"), r"\['nbits'\]='2' is not supported"),
    (hqq(nbits=True), r"\['nbits'\]=True is not supported"),
    (hqq(nbits=5), r"\['nbits'\]=5 is not supported"),
    (hqq(group_size=0), r"\['group_size'\] must be between 1 and"),
    (hqq(group_size=-16), r"\['group_size'\] must be between 1 and"),
    (hqq(group_size="16"), r"\['group_size'\] must be an int, got '16' \(str\): use group_size=16"),
    (hqq(group_size=None), r"\['group_size'\] must be an int, got None"),
    (hqq(axis=2), r"\['axis'\]=2 is not supported: use 0 or 1"),
    (hqq(optimize="yes"), r"\['optimize'\] must be True or False"),
    (hqq(scale=0), r"\['scale_quant_params'\]\['group_size'\] must be between 1"),
    (hqq(zero=2.5), r"\['zero_quant_params'\]\['group_size'\] must be an int"),
    ({"weight_quant_params": {"nbits": 2, "group_size": 16}, "scale_quant_params": {"nbits": 4, "group_size": 128}},
     r"\['scale_quant_params'\]\['nbits'\]=4 is not supported: scales and zeros are quantized to 8 bits"),
    ({"weight_quant_params": {"nbits": 2, "group_size": 16}, "zero_quant_params": True}, r"must be a dict"),
    ({"weight_quant_params": {"group_size": 16}}, r"has no 'nbits'"),
    ({"nbits": 2}, r"QuantConfig.ffn_config has no 'group_size'"),
    ("2bit", r"QuantConfig.ffn_config must be a dict"),
    ({"weight_quant_params": [2, 16]}, r"\['weight_quant_params'\] must be a dict"),
])
def test_quant_config_refuses_bad_settings(cfg, message):
    with pytest.raises(ValueError, match=message) as e:
        QuantConfig(ffn_config=cfg)
    assert "QuantConfig.ffn_config" in str(e.value)


def test_quant_config_accepts_hqq_and_flat_dicts():
    from hqq.core.quantize import BaseQuantizeConfig

    q = QuantConfig(ffn_config=BaseQuantizeConfig(nbits=2, group_size=16, quant_zero=True, quant_scale=True),
                    attn_config={"nbits": 4, "group_size": 64})
    assert q.ffn["nbits"] == 2 and q.ffn["quant_scale"] and q.attn["group_size"] == 64
    a = article_quant_config()
    assert QuantConfig.from_json(a.to_json()).to_json() == a.to_json()
    with pytest.raises(ValueError, match=r"'ffn' lacks \["):
        QuantConfig.from_json({"ffn": {"nbits": 2}})
    with pytest.raises(ValueError, match="from_json's argument must be a dict"):
        QuantConfig.from_json(None)


# --------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["cuda:7", "mps", "gpu0", "xpu:0", 3.5, ["cpu", "tpu"]])
def test_parse_devices_names_the_device_and_what_this_machine_has(device):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda:7" and n > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match="this machine has") as e:
        parse_devices(device)
    shown = device[-1] if isinstance(device, list) else device
    assert repr(shown) in str(e.value)


def test_parse_devices_accepts_cpu_lists_and_refuses_empty():
    assert parse_devices("cpu") == [torch.device("cpu")]
    assert parse_devices(["cpu", torch.device("cpu")]) == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="at least one device"):
        parse_devices([])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"'cuda' is not on this machine: this machine has no CUDA GPU"):
            parse_devices("cuda")


# --------------------------------------------------------------------------------------- secrets


SECRET = "hf_SeCrEtToKeN1234567890abcdef"


def test_notebook_settings_never_show_the_token(monkeypatch):
    from mixtral_nb.setup_env import NotebookSettings, notebook_settings

    monkeypatch.setenv("HF_TOKEN", SECRET)
    s = notebook_settings("embedded", "cpu")
    assert s.token == SECRET  # still usable for downloads
    stream = io.StringIO()
    log = logging.getLogger("mixtral_nb.test_config")
    handler = logging.StreamHandler(stream)
    log.addHandler(handler)
    try:
        log.warning("settings: %s %r", s, s)
    finally:
        log.removeHandler(handler)
    shown = [repr(s), str(s), f"{s}", f"{s!r}", s.describe(), stream.getvalue(), repr([s]), repr({"s": s})]
    for text in shown:
        assert SECRET not in text and SECRET[3:12] not in text
    assert "token='***'" in repr(s)
    assert "token=None" in repr(NotebookSettings("embedded", torch.device("cpu"), 8))


# --------------------------------------------------------------------------------------- fuzz

ANY = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.integers(-3, 40),
                st.floats(allow_nan=True), st.text(max_size=4), st.sampled_from(["4", "cuda", "1e3"]),
                st.lists(st.integers(0, 3), max_size=2))
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,  # reproducible, writes nothing
               suppress_health_check=[HealthCheck.too_slow])


SMALL = st.one_of(st.integers(-1, 12), ANY)  # mostly plausible values, so the checks after construction run too
SWITCH = st.one_of(st.booleans(), ANY)


@FUZZ
@given(st.fixed_dictionaries({f: SMALL for f in INT_FIELDS},
                             optional={f: SWITCH for f in ("host_mirror", "pin_memory")}),
       st.integers(1, 4), st.integers(1, 9), st.one_of(st.none(), st.integers(0, 1 << 32), ANY), SWITCH)
def test_fuzz_offload_config_and_check_fits(kw, layers, experts, vram, mirror):
    try:
        cfg = OffloadConfig(**kw)
    except ValueError:
        return
    try:
        cfg.check_model(layers, experts)
    except ValueError:
        pass
    sizes = ModelSizes.of({"num_hidden_layers": layers, "num_local_experts": experts, "hidden_size": 64,
                           "intermediate_size": 128, "vocab_size": 256, "num_attention_heads": 4,
                           "num_key_value_heads": 2}, QuantConfig(None, None))
    try:
        check_fits(cfg, vram, 1 << 34, sizes, host_mirror=mirror)
    except ValueError:
        pass


@FUZZ
@given(SMALL, SMALL, st.dictionaries(st.sampled_from(["buffer_size", "prefetch", "host_mirror", "clean_window"]), SMALL))
def test_fuzz_for_model(layers, experts, kw):
    try:
        OffloadConfig.for_model(layers, experts, **kw)
    except ValueError:
        pass


QUANT_KEYS = st.sampled_from(["nbits", "group_size", "axis", "optimize"])


@FUZZ
@given(st.one_of(ANY, st.dictionaries(QUANT_KEYS, SMALL)),
       st.one_of(st.none(), st.just("absent"), ANY, st.dictionaries(st.sampled_from(["nbits", "group_size"]), SMALL)),
       st.booleans())
def test_fuzz_quant_config(weight, meta, nested):
    cfg = weight
    if nested:
        cfg = {"weight_quant_params": weight}
        if meta != "absent":
            cfg["scale_quant_params"] = meta
            cfg["zero_quant_params"] = meta
    try:
        q = QuantConfig(ffn_config=cfg, attn_config=None)
        assert QuantConfig.from_json(q.to_json()).to_json() == q.to_json()
    except ValueError:
        pass


BYTES = st.one_of(st.integers(0, 1 << 40), ANY)


@FUZZ
@given(BYTES, BYTES, st.one_of(st.none(), BYTES), SMALL, st.one_of(st.integers(1, 1 << 16), ANY), SMALL, SMALL)
def test_fuzz_plan_inputs(vram, ram, disk, gpus, context, buffers, prefetch):
    try:
        plan(vram, ram, disk, gpus, context=context, buffer_size=buffers, prefetch=prefetch)
    except ValueError:  # MemoryPlanError is one
        pass


@FUZZ
@given(st.fixed_dictionaries({k: st.one_of(st.integers(-2, 70), ANY) for k in (
    "num_hidden_layers", "num_local_experts", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
    "num_key_value_heads")}, optional={"head_dim": ANY}), st.sampled_from([None, "article", "fp"]), ANY)
def test_fuzz_model_sizes(config, quant, name):
    q = {None: None, "article": article_quant_config(), "fp": QuantConfig(None, None)}[quant]
    try:
        ModelSizes.of(config, q)
    except ValueError:
        pass
    try:
        preset(name)
    except MemoryPlanError:
        pass
    except ValueError:
        pass


def test_notebook_settings_and_load_refuse_unknown_devices():
    from mixtral_nb.load import load
    from mixtral_nb.setup_env import notebook_settings

    with pytest.raises(ValueError, match=r"device 'gpu0' is not a device name: this machine has"):
        notebook_settings("auto", "gpu0")
    with pytest.raises(ValueError, match=r"device 'mps': mixtral_nb runs on \"cpu\" or CUDA GPUs only"):
        load("embedded", device="mps")


def test_memory_plan_refuses_a_bad_offload_per_layer():
    from mixtral_nb.setup_env import memory_plan, notebook_settings

    s = notebook_settings("embedded", "cpu")
    with pytest.raises(ValueError, match=r"offload_per_layer must be an int, got '4' \(str\): use offload_per_layer=4"):
        memory_plan(s, preset="colab-t4", offload_per_layer="4")
    with pytest.raises(ValueError, match=r"offload_per_layer must be between 0 and 7 .*, got 8"):
        memory_plan(s, preset="colab-t4", offload_per_layer=8)
    assert memory_plan(s, preset="colab-t4", offload_per_layer=5).offload_config().offload_per_layer == 5


def test_gpu_slots_per_layer():
    cfg = OffloadConfig.for_slots(8, [6, 5, 6], buffer_size=2)
    assert cfg.gpu_slots == (6, 5, 6) and (cfg.main_size, cfg.offload_size, cfg.offload_per_layer) == (17, 7, 3)
    assert cfg.slots_per_layer(3, 8) == [6, 5, 6] and cfg.part([0, 2]).gpu_slots == (6, 6)
    cfg.check_model(3, 8)
    uniform = OffloadConfig.for_model(3, 8, offload_per_layer=2)
    assert uniform.slots_per_layer(3, 8) == [6, 6, 6] and uniform.part([1]) is uniform
    with pytest.raises(ValueError, match=r"gpu_slots\[1\] must be between 1 and \d+ \(a layer needs at least one GPU"):
        OffloadConfig.for_slots(8, (6, 0))
    with pytest.raises(ValueError, match=r"gpu_slots\[0\] must be an int, got 5.5"):
        OffloadConfig.for_slots(8, (5.5,))
    with pytest.raises(ValueError, match=r"gpu_slots must be a non-empty tuple of ints .* got 'abc'"):
        OffloadConfig(main_size=1, offload_size=0, offload_per_layer=0, gpu_slots="abc")
    with pytest.raises(ValueError, match="for_slots derives main_size"):
        OffloadConfig.for_slots(8, (6,), main_size=3)
    with pytest.raises(ValueError, match=r"too small for gpu_slots summing to 17 .* use main_size=17"):
        dataclasses.replace(cfg, main_size=10).check_model(3, 8)
