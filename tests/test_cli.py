"""The command line a README reader types: one question to the embedded model, and the memory plan."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_nb", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_chat_answers_one_prompt_with_the_embedded_model():
    proc = run_cli("chat", "--model", "embedded", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout
    assert "tok/s" in proc.stderr


def test_plan_prints_the_memory_plan():
    proc = run_cli("plan", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Memory plan" in proc.stdout and "offload_per_layer=" in proc.stdout


def test_unknown_command_fails_with_usage():
    proc = run_cli("frobnicate", timeout=120)
    assert proc.returncode != 0 and "usage" in proc.stderr.lower()
