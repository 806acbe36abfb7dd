"""Typed configuration: model sizes and presets, parallel layouts."""
from megatron_vita.config.model import (
    PRESETS,
    SPECIAL_TOKENS,
    LanguageConfig,
    ModelConfig,
    ProjectorConfig,
    TokenIds,
    VisionConfig,
    resolve_model_config,
)
from megatron_vita.config.parallel import ParallelConfig

__all__ = [
    "PRESETS", "SPECIAL_TOKENS", "LanguageConfig", "ModelConfig", "ProjectorConfig", "TokenIds",
    "VisionConfig", "ParallelConfig", "resolve_model_config",
]
