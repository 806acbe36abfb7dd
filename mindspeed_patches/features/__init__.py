"""The NPU features mindspeed_patches knows, in the order they register their patches.

Empty for now: the fused-kernel features (`use-fused-rmsnorm`, `use-fused-swiglu`,
`use-fused-rotary-pos-emb`, `use-flash-attn`, ...) arrive with the NPU kernels. Order matters
only for wrappers of the same target: a later feature's wrapper sits outside an earlier one's.
"""
from typing import List, Type

from mindspeed_patches.features.base import Feature, FeatureArgumentError, FeatureManager, flag_dest, flag_enabled

FEATURES: List[Type[Feature]] = []

__all__ = ["FEATURES", "Feature", "FeatureArgumentError", "FeatureManager", "flag_dest", "flag_enabled"]
