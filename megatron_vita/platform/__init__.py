"""The backend switch (cpu | cuda | npu): the one place that knows which hardware runs.

    from megatron_vita import platform
    plat = platform.activate("cpu")     # or None: --backend / $MEGATRON_VITA_BACKEND / auto
    plat.device(), plat.dist_backend, plat.memory_stats(), plat.synchronize()
    platform.activate("npu", features=["use-fused-rmsnorm"])   # kernel flags: config.features
"""
from megatron_vita.platform.backend import (
    BACKENDS,
    ENV_VAR,
    BackendUnavailableError,
    Platform,
    activate,
    current,
    resolve_backend,
)
from megatron_vita.platform.distributed import DistributedRunError, init_distributed, spawn
from megatron_vita.config.features import known_feature_names
from megatron_vita.platform.features import feature_problems, torch_npu_emulation

__all__ = [
    "BACKENDS", "ENV_VAR", "BackendUnavailableError", "Platform", "activate", "current", "resolve_backend",
    "DistributedRunError", "init_distributed", "spawn", "feature_problems", "known_feature_names",
    "torch_npu_emulation",
]
