"""Shared fixtures: small checkpoints are written once per test session and reused."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 4-layer, 8-expert Mixtral in the original hub layout."""
    from mixtral_nb.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir):
    """transformers' own MixtralForCausalLM loaded from the same folder (the reference)."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
