"""Fixes for defects of megatron-core 0.12.1 that bite outside its CUDA + TransformerEngine home.

Applied once per process by `megatron_vita.platform.activate` on every backend, before models
are built. Each fix states the defect; each is a no-op where the defect cannot trigger.
"""
from __future__ import annotations

_APPLIED = False


def _fix_fp8_quantize_without_te() -> None:
    """DistributedOptimizer calls fp8_utils.quantize_param_shard on every step, even with no FP8
    parameter; without TransformerEngine that function raises "Invalid Transformer Engine
    version". With no FP8 parameters there is nothing to quantize."""
    from megatron.core.optimizer import distrib_optimizer

    original = distrib_optimizer.quantize_param_shard

    def quantize_param_shard(model_params, *args, **kwargs):
        if len(model_params) == 0:
            return None
        return original(model_params, *args, **kwargs)

    distrib_optimizer.quantize_param_shard = quantize_param_shard


def _fix_destroy_model_parallel() -> None:
    """destroy_model_parallel leaves the embedding groups' global rank lists behind, so a rank
    outside the next layout's embedding groups believes it is still a member."""
    from megatron.core import parallel_state as ps

    original = ps.destroy_model_parallel

    def destroy_model_parallel():
        original()
        ps._EMBEDDING_GLOBAL_RANKS = None
        ps._POSITION_EMBEDDING_GLOBAL_RANKS = None

    ps.destroy_model_parallel = destroy_model_parallel


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _fix_fp8_quantize_without_te()
    _fix_destroy_model_parallel()
    _APPLIED = True
