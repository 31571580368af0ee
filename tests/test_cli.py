"""The command line a README reader types: one question to the embedded model, the memory plan, and
one-line errors (exit code 2, no traceback) for every bad input, before anything loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mixtral_nb.__main__ import main, plan_table
from mixtral_nb.planner import PRESETS, Machine
from mixtral_nb.units import GiB


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_nb", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def call(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr); argparse's own errors exit via SystemExit."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.slow
def test_chat_answers_one_prompt_with_the_embedded_model():
    proc = run_cli("chat", "--model", "embedded", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout
    assert "tok/s" in proc.stderr


def test_plan_prints_the_memory_plan():
    # a small model, so the plan for this machine fits whatever RAM the test machine has free
    # (Mixtral-8x7B on a CPU needs ~21 GiB; the machine-fits-nothing path has its own test)
    proc = run_cli("plan", "--model", "olmoe-1b-7b", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Memory plan" in proc.stdout and "offload_per_layer=" in proc.stdout


def test_unknown_command_fails_with_one_line_naming_the_commands():
    proc = run_cli("frobnicate", timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "'frobnicate'", "chat", "plan", "--help")


def test_mistyped_model_name_is_one_line_before_loading_anything():
    proc = run_cli("chat", "--model", "mixtrall", "--prompt", "hi", timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.stderr.strip() == ("error: --model 'mixtrall' is neither auto, embedded, an existing folder nor a hub id "
                                   "(owner/name)")


@pytest.mark.parametrize("model", ["mixtrall", "/no/such/folder", "./missing-folder", "a/b/c"])
def test_bad_model_names(capsys, model):
    rc, out, err = call(capsys, "chat", "--model", model, "--prompt", "hi")
    assert_one_line_error(rc, err, f"--model {model!r}", "auto", "embedded", "existing folder", "owner/name")
    assert out == ""


def test_unreachable_hub_id_is_one_line(tmp_path):
    proc = run_cli("chat", "--model", "nobody/nothing-here", "--prompt", "hi", "--device", "cpu", timeout=180,
                   env={"HF_HUB_OFFLINE": "1", "MIXTRAL_NB_CACHE": str(tmp_path)})
    assert_one_line_error(proc.returncode, proc.stderr, "nobody/nothing-here", "HF_HUB_OFFLINE")
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("value", ["0", "-5", "ten", "1.5"])
def test_max_new_tokens_must_be_a_positive_integer(capsys, value):
    rc, _, err = call(capsys, "chat", "--model", "embedded", "--max-new-tokens", value)
    assert_one_line_error(rc, err, "--max-new-tokens", repr(value), ">= 1")


@pytest.mark.parametrize("device", ["gpu0", "tpu", "cuda:99"] + ([] if __import__("torch").cuda.is_available() else ["cuda"]))
@pytest.mark.parametrize("cmd", ["chat", "demo"])
def test_bad_device_is_one_line_naming_it_and_what_this_machine_has(capsys, cmd, device):
    rc, _, err = call(capsys, cmd, "--device", device)
    assert_one_line_error(rc, err, "--device", repr(device), "cpu")


@pytest.mark.parametrize("opt,value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"),
                                       ("--top-p", "1.5"), ("--top-p", "x")])
def test_bad_sampling_settings(capsys, opt, value):
    rc, _, err = call(capsys, "chat", "--model", "embedded", opt, value)
    assert_one_line_error(rc, err, opt, repr(value))


def test_plan_all_lists_every_preset(capsys):
    rc, out, err = call(capsys, "plan", "--all")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 + len(PRESETS)
    assert lines[0].split()[:2] == ["preset", "machine"] and "offload_per_layer" in lines[0] and "fits" in lines[0]
    for name, m in PRESETS.items():
        row = next(line for line in lines[1:] if line.split()[0] == name)
        assert m.description in row
        assert row.rstrip().endswith("yes")  # every preset has a plan today
    t4 = next(line for line in lines if line.startswith("colab-t4 "))
    assert f" {PRESETS['colab-t4'].plan().offload_per_layer} " in t4 and "swap" in t4


def test_plan_preset_prints_one_row(capsys):
    rc, out, err = call(capsys, "plan", "--preset", "colab-t4")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("colab-t4 ")


def test_plan_unknown_preset_names_the_choices(capsys):
    rc, _, err = call(capsys, "plan", "--preset", "colab")
    assert_one_line_error(rc, err, "'colab'", *PRESETS)


def test_plan_table_shows_why_a_machine_has_no_plan():
    table = plan_table({"tiny": Machine(1 * GiB, 2 * GiB, 1, None, "a 1 GiB card"), "t4": PRESETS["colab-t4"]})
    tiny = next(line for line in table.splitlines() if line.startswith("tiny "))
    assert "a 1 GiB card" in tiny and "no plan: " in tiny and "VRAM" in tiny
    assert next(line for line in table.splitlines() if line.startswith("t4 ")).rstrip().endswith("yes")


def test_plan_when_this_machine_fits_nothing_is_one_line(capsys):
    rc, out, err = call(capsys, "plan", "--context", str(1 << 24))  # a KV cache no machine here holds
    assert_one_line_error(rc, err, "error: ")
    assert out == ""


@pytest.mark.parametrize("cmd", ["chat", "demo", "synthetic", "verify", "plan", "bench", "rehearse"])
def test_help_of_every_subcommand_shows_defaults(capsys, cmd):
    rc, out, _ = call(capsys, cmd, "--help")
    assert rc == 0
    options = [line for line in out.split("options:")[1].splitlines() if line.startswith("  --")]
    assert options  # every option except -h/--help says its default
    assert " ".join(out.split()).count("(default: ") == len(options), out


@pytest.mark.parametrize("cmd", ["quantize", "notebooks", "check-notebooks", "nbval-prepare"])
def test_help_of_the_other_subcommands(capsys, cmd):
    rc, out, _ = call(capsys, cmd, "--help")
    assert rc == 0 and "usage:" in out
