"""mindspeed_patches: megatron-vita's Ascend NPU adapter, in the style of MindSpeed.

On the NPU backend `megatron_vita.platform` calls `apply_for_npu()` once, after torch_npu.
Features (one per fused kernel, each switched on by its CLI flag) register patches on the
registry; the registry applies them to megatron-core and can remove them exactly. The same
process-wide registry carries megatron-vita's own megatron-core fixes on every backend
(`megatron_vita.parallel.megatron_patches`), so `REGISTRY.entries()` lists everything that
changed megatron-core, and why. Nothing here imports torch or megatron at import time.
"""
from mindspeed_patches.adaptor import (
    MindSpeedOverlapWarning,
    add_arguments,
    apply_for_npu,
    import_mindspeed,
    is_applied,
    load_mindspeed,
    mindspeed_patched,
    notes,
    remove_all,
)
from mindspeed_patches.features import FEATURES, Feature, FeatureArgumentError, FeatureManager
from mindspeed_patches.registry import (
    EXPECTED_MEGATRON_CORE,
    REGISTRY,
    MegatronVersionError,
    MegatronVersionWarning,
    PatchConflictError,
    PatchEntry,
    PatchError,
    PatchRegistry,
    PatchTargetError,
    apply_patches,
    check_megatron_core_version,
    installed_megatron_core_version,
    register_patch,
    remove_patches,
)

__all__ = [
    "MindSpeedOverlapWarning", "add_arguments", "apply_for_npu", "import_mindspeed", "is_applied",
    "load_mindspeed", "mindspeed_patched", "notes", "remove_all",
    "FEATURES", "Feature", "FeatureArgumentError", "FeatureManager",
    "EXPECTED_MEGATRON_CORE", "REGISTRY", "MegatronVersionError", "MegatronVersionWarning",
    "PatchConflictError", "PatchEntry", "PatchError", "PatchRegistry", "PatchTargetError", "apply_patches",
    "check_megatron_core_version", "installed_megatron_core_version", "register_patch", "remove_patches",
]
