"""The leaves `select_leaves` picks reach every layer of the model, the LLM's final norm included.

A fused-kernel norm class chosen as the LLM's norm leaf must replace the plain RMSNorm in every
decoder layer (input and pre-MLP norms) and in the final norm of the last pipeline stage; before
this test the final norm was always the plain class, whatever the leaf.
"""
import dataclasses

import pytest

from mv_testlib import spawn


def _norm_classes(rank, world):
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.common.leaves import select_leaves
    from megatron_vita.models.common.norms import RMSNorm
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.state import parallel_layout

    class KernelNorm(RMSNorm):
        """Stands for a backend's norm leaf (e.g. a fused kernel's class)."""

    cfg = ModelConfig.from_name("tiny")
    par = ParallelConfig()
    with parallel_layout(par):
        leaves = dataclasses.replace(select_leaves(par), language_norm=KernelNorm)
        model = build_model_chunks(cfg, par, language_layer_spec=leaves.language_layer_spec(),
                                   vision_layer_spec=leaves.vision_layer_spec())[0]
        llm = model.language_model
        return {name: type(m).__name__ for name, m in llm.named_modules() if isinstance(m, RMSNorm)}


@pytest.mark.timeout(180)
def test_the_language_norm_leaf_is_every_llm_norm_including_the_final_one():
    (norms,) = spawn(_norm_classes, 1, timeout=150)
    assert "decoder.final_layernorm" in norms, sorted(norms)
    assert sum(n.endswith("input_layernorm") for n in norms) >= 2, sorted(norms)
    assert set(norms.values()) == {"KernelNorm"}, norms
