"""Shared fixtures for the HF-side tests: one tiny random checkpoint per session."""
import pytest
import torch

import megatron_vita  # noqa: F401  (registers model_type "long_vita" with the Auto classes)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from megatron_vita.hf.tiny import create_tiny

    return create_tiny(str(tmp_path_factory.mktemp("tiny_hf")), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The tiny checkpoint loaded through AutoModelForCausalLM (read-only: do not modify)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return model.eval()
