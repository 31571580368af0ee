"""The benchmark harness on a tiny CPU model: every metric is printed, finite, and in the JSON."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mixtral_nb import bench
from mixtral_nb.config import article_quant_config
from mixtral_nb.families import FAMILIES, skeleton
from mixtral_nb.quant import QSpec, dequantize

LINE = re.compile(r"^(\w+)\.(\w+) = (\S+)$")
METRICS = ("decode_tok_s", "prefill_tok_s", "h2d_bytes_per_token", "d2h_bytes_per_token", "hit_rate",
           "prefetch_recall", "prefetch_precision", "copy_wait_s_per_token", "host_syncs_per_token", "peak_vram_gib",
           "pinned_host_gib", "h2d_gbps", "transfer_limit_tok_s", "efficiency", "t4_projected_tok_s",
           "overhead_s_per_token", "gpu_read_bytes_per_token")


def run(argv, capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert bench.bench_main(argv + ["--json", str(path)]) == 0
    printed: dict[str, dict[str, float]] = {}
    for line in capsys.readouterr().out.splitlines():
        m = LINE.match(line)
        if m:
            printed.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return printed, json.loads(path.read_text())


@pytest.mark.timeout(60)
def test_tiny_prints_every_metric(capsys, tmp_path):
    printed, data = run(["--tiny", "--routing", "iid", "--repeat", "2"], capsys, tmp_path)
    ours = printed["ours"]
    for name in METRICS:
        assert name in ours, f"{name} not printed"
        assert math.isfinite(ours[name]), f"{name} = {ours[name]}"
        assert math.isclose(data["runs"]["ours"][name], ours[name], rel_tol=1e-3, abs_tol=1e-4)
    for name, v in ours.items():
        assert math.isfinite(v), f"{name} = {v}"
    assert ours["decode_tok_s"] > 0 and ours["prefill_tok_s"] > 0
    assert 0 < ours["hit_rate"] < 1  # 4 of 8 experts offloaded, random routing: some hits, some misses
    assert ours["h2d_bytes_per_token"] > 0
    assert ours["host_syncs_per_token"] == 4  # one per layer
    assert ours["outputs_finite"] == 1


@pytest.mark.timeout(60)
def test_tiny_compare(capsys, tmp_path):
    printed, data = run(["--tiny", "--compare", "--new-tokens", "8"], capsys, tmp_path)
    assert set(printed) == {"ours", "baseline", "compare"}
    for mode in ("ours", "baseline"):
        for name in METRICS:
            assert math.isfinite(printed[mode][name]), f"{mode}.{name}"
    base = printed["baseline"]
    assert base["prefetch_precision"] == 0 and base["d2h_bytes_per_token"] > 0  # write-back on every miss
    assert math.isclose(printed["compare"]["speedup_decode"],
                        printed["ours"]["decode_tok_s"] / base["decode_tok_s"], rel_tol=1e-3)
    assert "speedup_decode" in data



CHAT = ("chat_synced_tok_s", "chat_synced_monitor_tok_s", "chat_synced_watch_tok_s", "chat_session_tok_s",
        "chat_session_watch_tok_s")


@pytest.mark.timeout(180)
def test_tiny_chat_paths(capsys, tmp_path):
    """--chat: decode read token by token, under the monitors, and through a real ChatSession (the toy
    vocabulary widened to the Mixtral tokenizer's); without --chat none of these figures appear."""
    printed, data = run(["--tiny", "--chat", "--new-tokens", "6"], capsys, tmp_path)
    ours = printed["ours"]
    for name in CHAT:
        assert name in ours and math.isfinite(ours[name]) and ours[name] > 0, name
        assert math.isclose(data["runs"]["ours"][name], ours[name], rel_tol=1e-3)
    printed, _ = run(["--tiny", "--new-tokens", "4"], capsys, tmp_path)
    assert not any(k.startswith("chat_") for k in printed["ours"])



@pytest.mark.timeout(120)
def test_tiny_in_the_article_layout(capsys, tmp_path):
    """--layout article builds axis-0 codes (what the article's files and their converted copy hold), and
    they decode to finite tokens; the layout exists for the article's Mixtral only."""
    from mixtral_nb.bench import bench_quant

    assert bench_quant("article").ffn["axis"] == 0 and bench_quant("article").attn["axis"] == 0
    assert bench_quant("ours").ffn["axis"] == 1
    printed, _ = run(["--tiny", "--layout", "article", "--new-tokens", "4"], capsys, tmp_path)
    assert printed["ours"]["outputs_finite"] == 1 and printed["ours"]["decode_tok_s"] > 0
    with pytest.raises(SystemExit):
        bench.bench_main(["--tiny", "--layout", "article", "--model", "qwen3-30b-a3b"])
    assert "--layout article is the layout of the article's Mixtral-8x7B checkpoint" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_tiny_resident(capsys, tmp_path):
    printed, _ = run(["--tiny", "--resident", "--new-tokens", "4"], capsys, tmp_path)
    res = printed["resident"]
    assert res["hit_rate"] == 1 and res["h2d_bytes_per_token"] == 0
    assert math.isinf(res["transfer_limit_tok_s"])


def test_synthetic_weights_have_the_intended_scale():
    """Random codes + the chosen meta give W with std ~ 1/sqrt(in_features), zero mean-ish."""
    gen = torch.Generator().manual_seed(0)
    for params, shape in ((article_quant_config().ffn, (256, 512)), (article_quant_config().attn, (128, 256))):
        spec = QSpec.make(shape, params)
        t = {s.name: torch.empty(s.shape, dtype=s.dtype) for s in spec.layout().segments}
        bench.fill_quantized(t, spec, gen)
        w = dequantize(t, spec)
        target = shape[1] ** -0.5
        assert 0.7 * target < w.std().item() < 1.4 * target
        assert abs(w.mean().item()) < 0.3 * target


def test_t4_throttle_arithmetic():
    """The padding that makes this GPU's copies and memory reads last as long as a T4's."""
    th = bench.Throttle(h2d_bps=50e9, d2h_bps=40e9, hbm_bps=4e12, spin_hz=1.5e9)
    n = 66_404_736  # one Mixtral expert blob
    assert math.isclose(th.copy_pad_s("h2d", n), n / 9.7e9 - n / 50e9)
    assert math.isclose(th.copy_pad_s("d2h", n), n / 9.7e9 - n / 40e9)
    # padded copy + the copy itself = the T4's time: n bytes at 9.7 GB/s
    assert math.isclose(n / 50e9 + th.copy_pad_s("h2d", n), n / bench.T4_H2D_BPS)
    assert math.isclose(th.gpu_pad_s(1e9), 1e9 / 240e9 - 1e9 / 4e12)
    assert th.cycles(th.copy_pad_s("h2d", n)) == round((n / 9.7e9 - n / 50e9) * 1.5e9)
    slower = bench.Throttle(h2d_bps=5e9, d2h_bps=5e9, hbm_bps=100e9, spin_hz=1e9)
    assert slower.copy_pad_s("h2d", n) == 0 and slower.gpu_pad_s(1e9) == 0 and slower.cycles(0.0) == 0
    # calibration: cycles over the median spin time
    assert bench.cycles_per_s(3_000_000, [0.0021, 0.002, 0.0019]) == pytest.approx(1.5e9)
    with pytest.raises(ValueError, match="timer did not advance"):
        bench.cycles_per_s(1000, [0.0, 0.0, 0.0])


@pytest.mark.timeout(120)
def test_tiny_at_the_colab_plan(capsys, tmp_path):
    """--plan colab-t4 on the tiny model: the plan's per-layer slots and spare host blobs, D2H/H2D and
    the time to first token reported; --emulate and --copy-only refuse a CPU run in one line."""
    printed, _ = run(["--tiny", "--plan", "colab-t4", "--routing", "iid", "--new-tokens", "24", "--ttft-prompt", "64"],
                     capsys, tmp_path)
    ours = printed["ours"]
    plan = bench.bench_plan(bench._parser().parse_args(["--plan", "colab-t4"]), 4)
    assert ours["gpu_expert_slots"] == sum(plan.layer_slots()) and ours["extra_host_slots"] > 0
    assert ours["ttft_s"] > 0 and ours["ttft_prompt_tokens"] == 64
    assert ours["h2d_bytes_per_token"] > 0
    assert ours["d2h_per_h2d"] <= 0.3  # spare host blobs: evictions rarely write back
    for flag in (["--emulate", "t4"], ["--copy-only"]):
        with pytest.raises(SystemExit) as e:
            bench.bench_main(["--tiny", *flag])
        assert e.value.code == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


class RecordingThrottle(bench.Throttle):
    """The throttle's arithmetic with its GPU spin recorded instead (a CPU has no torch.cuda._sleep)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        object.__setattr__(self, "spins", [])

    def spin(self, seconds: float) -> None:
        self.spins.append(seconds)


def test_t4_emulation_pads_every_layer_and_the_head(tiny_dir):
    """The hooks pad each layer twice (attention before the experts' host sync, the experts used after)
    and lm_head once per forward; removing them leaves the model as it was."""
    from mixtral_nb import OffloadConfig, QuantConfig, build_model
    from mixtral_nb.engine import make_engine
    from mixtral_nb.generate import generate_tokens

    cfg = OffloadConfig.for_model(4, 8, offload_per_layer=3, buffer_size=2, prefetch=0)
    model = build_model("cpu", QuantConfig(None, None), cfg, tiny_dir)
    th = RecordingThrottle(h2d_bps=50e9, d2h_bps=50e9, hbm_bps=2e12, spin_hz=1e9)
    emu = bench.T4Emulation(model, th, context=32)
    attn, expert, head = bench.layer_read_bytes(model, 32)
    assert emu.attn_s == pytest.approx(th.gpu_pad_s(attn)) and emu.head_s == pytest.approx(th.gpu_pad_s(head))
    assert model.expert_cache.copy_pad == th.pad_copy
    engine = make_engine(model, "decoder", max_length=64)
    prompt = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = list(generate_tokens(engine, prompt, 3))  # a prefill and two one-token steps
    assert len(tokens) == 3
    assert len(th.spins) == 3 * (4 * 2 + 1)
    assert th.spins.count(emu.attn_s) == 12 and th.spins.count(emu.head_s) == 3
    assert th.spins.count(pytest.approx(2 * emu.expert_s)) >= 8  # one token: its two experts
    assert th.spins.count(pytest.approx(8 * emu.expert_s)) == 4  # the 8-token prefill: all 8 experts
    emu.remove()
    assert model.expert_cache.copy_pad is None
    with torch.inference_mode():
        list(generate_tokens(engine, prompt, 2))
    assert len(th.spins) == 27


FAMILY_MODELS = ["mixtral-8x22b", "phi-3.5-moe", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_tiny_of_every_family(model, capsys, tmp_path):
    """Each family's toy model through build_model and its engine (the Decoder where the family has Mixtral's
    layer shape, else transformers' forward): tokens come out, the hit rate is a rate, and every decoded token
    used exactly the family's own top-k in each MoE layer."""
    from mixtral_nb.known_models import model_config

    printed, data = run(["--tiny", "--model", model, "--routing", "iid", "--new-tokens", "8", "--ttft-prompt", "16"],
                        capsys, tmp_path)
    ours = printed["ours"]
    sk = skeleton(model_config(model))
    family = FAMILIES[model_config(model).model_type]
    assert data["args"]["engine"] == ("decoder" if family.decoder else "transformers")
    assert ours["decode_tok_s"] > 0 and 0 <= ours["hit_rate"] <= 1 and ours["outputs_finite"] == 1
    assert ours["top_k"] == sk.top_k
    assert ours["expert_uses_per_token"] == ours["moe_layers"] * sk.top_k


def test_synthetic_checkpoint_holds_every_family_tensor():
    """The synthetic trunk is exactly the family's: every parameter of its skeleton (quantized ones as their
    stored segments), routers scaled up, norms at one, biases at zero."""
    for model in FAMILY_MODELS:
        cfg = bench.bench_config(model, tiny=True)
        ck = bench.SyntheticCheckpoint(cfg, article_quant_config(), "cpu", torch.float32)
        sk = ck.skeleton
        got = dict(ck.trunk())
        bases = {n.rpartition(".")[0] for n in got}
        for name, shape in sk.shapes.items():
            base = name.rpartition(".")[0]
            if base in ck.attn_specs and name.endswith(".weight"):
                assert base in bases and name not in got
            elif not (name == "lm_head.weight" and sk.tied):
                assert tuple(got[name].shape) == shape, name
                if name.endswith("norm.weight"):
                    assert bool((got[name] == 1).all()), name
                elif name.endswith(".bias"):
                    assert bool((got[name] == 0).all()), name
        assert set(ck.attn_specs) == set(sk.attn_linears(FAMILIES[cfg["model_type"]]))


def test_bench_refuses_what_the_family_cannot_do(capsys):
    """The Decoder does not run DeepSeek-V2 (MLA); a plan that does not fit is one error naming the model,
    before any build."""
    with pytest.raises(SystemExit) as e:
        bench.bench_main(["--tiny", "--model", "deepseek-v2-lite", "--engine", "decoder"])
    err = capsys.readouterr().err
    runs = ", ".join(f.model_type for f in FAMILIES.values() if f.decoder)
    assert e.value.code == 2 and f"runs {runs} models only" in err and "is deepseek_v2" in err
    assert "deepseek_v2" not in runs
    with pytest.raises(SystemExit) as e:
        bench.bench_main(["--tiny", "--model", "mixtral-8x22b", "--plan", "colab-t4"])
    assert e.value.code == 2 and "no plan for mixtral-8x22b" in capsys.readouterr().err


def test_t4_emulation_skips_dense_layers():
    """--emulate t4 on a family with a dense layer (Qwen3's mlp_only_layers): the MoE layers are padded as
    Mixtral's are, the dense one has no expert call to pad, and nothing fails on it."""
    from mixtral_nb import OffloadConfig, build_model
    from mixtral_nb.engine import make_engine
    from mixtral_nb.generate import generate_tokens

    cfg = bench.bench_config("qwen3-30b-a3b", tiny=True)
    ck = bench.SyntheticCheckpoint(cfg, article_quant_config(), "cpu", torch.float32)
    moe = ck.skeleton.moe_layers
    assert len(moe) < cfg["num_hidden_layers"]
    off = OffloadConfig.for_model(len(moe), ck.skeleton.num_experts, offload_per_layer=64, buffer_size=2, prefetch=0)
    model = build_model("cpu", None, off, ck, dtype=torch.float32)
    th = RecordingThrottle(h2d_bps=50e9, d2h_bps=50e9, hbm_bps=2e12, spin_hz=1e9)
    emu = bench.T4Emulation(model, th, context=32)
    assert len(emu.handles) == 2 * len(moe) + 1
    engine = make_engine(model, "transformers", max_length=64)
    with torch.inference_mode():
        tokens = list(generate_tokens(engine, torch.randint(3, 256, (1, 8)), 3))
    assert len(tokens) == 3 and len(th.spins) == 3 * (2 * len(moe) + 1)
    assert th.spins.count(pytest.approx(ck.skeleton.top_k * emu.expert_s)) >= 2 * len(moe)  # one token: its k experts
    emu.remove()


@pytest.mark.timeout(300)
def test_gpu_record_families_step_command_lines(capsys, tmp_path):
    """The `families` step of scripts/gpu_record.sh (run on the H200 later): its dry run prints the bench and
    plan command lines; each bench line, plus --tiny, is refused here only for want of a GPU (its --emulate t4) and
    runs without --emulate, and the plan line prints the table."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from mixtral_nb.__main__ import main

    root = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "DRY_RUN": "1", "PY": sys.executable}
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_record.sh"), "families"], capture_output=True, text=True,
                          env=env, timeout=60, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    benches = [a[3:] for a in lines if a[1:4] == ["-m", "mixtral_nb", "bench"]]
    plans = [a[3:] for a in lines if a[1:4] == ["-m", "mixtral_nb", "plan"]]
    assert len(benches) == 2 and plans == [["plan", "--model", "all", "--all"]]
    models = [a[a.index("--model") + 1] for a in benches]
    assert sorted(models) == ["phi-3.5-moe", "qwen3-30b-a3b"]
    for argv in benches:
        assert argv[argv.index("--plan") + 1] == "colab-t4" and argv[argv.index("--routing") + 1] == "iid"
        assert argv[argv.index("--emulate") + 1] == "t4"
        argv = [*argv[1:argv.index("--json") + 1], str(tmp_path / "bench.json"), "--tiny"]
        with pytest.raises(SystemExit) as e:  # the emulation is refused only for want of a GPU
            bench.bench_main(argv)
        assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
        i = argv.index("--emulate")
        assert bench.bench_main(argv[:i] + argv[i + 2:]) == 0  # the plain half runs here
        data = json.loads((tmp_path / "bench.json").read_text())
        assert data["args"]["model"] in models and data["runs"]["ours"]["decode_tok_s"] > 0
    capsys.readouterr()
    assert main(plans[0]) == 0
    assert "| qwen3-30b-a3b " in capsys.readouterr().out


def test_efficiency_is_speed_over_the_copy_bound_limit():
    """1 GB copied per token at 20 GB/s allows 20 tok/s: decoding 10 tok/s is half of it; no copies, no figure."""
    assert bench._efficiency(10.0, 1e9, 20e9) == pytest.approx(0.5)
    assert bench._efficiency(6.27, 1.3e9, bench.T4_H2D_BPS) == pytest.approx(6.27 / (9.7e9 / 1.3e9))
    assert math.isnan(bench._efficiency(10.0, 0.0, 20e9))
