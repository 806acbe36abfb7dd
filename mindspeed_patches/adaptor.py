"""`apply_for_npu`: prepare megatron-core for Ascend NPUs, once per process.

`megatron_vita.platform.activate("npu")` calls it after importing `torch_npu` and
`torch_npu.contrib.transfer_to_npu` (which redirect torch.cuda / 'cuda' / nccl to the NPU).
It then

1. checks the installed megatron-core against `EXPECTED_MEGATRON_CORE` (a warning on a
   mismatch; an error with `strict_version=True` or `MINDSPEED_PATCHES_STRICT_VERSION=1`);
2. imports `mindspeed.megatron_adaptor` when the MindSpeed package is installed. MindSpeed is
   optional: it is not on PyPI (the PyPI name is a placeholder) and must be installed from
   source, from the branch that targets megatron-core 0.12.1
   (`git clone -b <branch for core_r0.12.1> https://gitee.com/ascend/MindSpeed && pip install -e MindSpeed`);
3. runs the feature manager over `FEATURES` (flags from `args`, else from `sys.argv`),
   registers the enabled features' patches and applies them.

MindSpeed interop (`load_mindspeed`, which the platform calls BEFORE megatron-vita's own
megatron-core fixes are applied): MindSpeed's adaptor goes first, ours after it, and no symbol
is patched twice. What MindSpeed patched is read from its patch manager
(`mindspeed.patch_utils.MindSpeedPatchesManager.patches_info`, keyed by dotted target) and
declared foreign on the registry. Then
  * a feature whose patches touch a symbol MindSpeed already patched is SKIPPED, with a note
    (`notes()`, and a MindSpeedOverlapWarning): MindSpeed already put its kernel there, e.g.
    its fused RMSNorm under --use-fused-rmsnorm; ours would be a second patch of the same symbol;
  * one of megatron-vita's own megatron-core fixes on such a symbol FAILS, one line per symbol
    (registry.PatchConflictError): the fix is needed for correctness and cannot be dropped, and
    stacking it on MindSpeed's version is exactly the double patch this rules out;
  * a MindSpeed whose adaptor does not import (the usual sign of a branch written for another
    megatron-core: a megatron symbol it imports is missing) fails in one line naming the
    error and the megatron-core versions.

A second call is a no-op. `remove_all()` undoes everything this module applied (for tests).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Type

from mindspeed_patches.features import FEATURES, Feature, FeatureManager
from mindspeed_patches.registry import (
    EXPECTED_MEGATRON_CORE,
    REGISTRY,
    PatchError,
    PatchRegistry,
    _describe,
    check_megatron_core_version,
    version_note,
)

MINDSPEED_ADAPTOR = "mindspeed.megatron_adaptor"
MINDSPEED_PATCH_MANAGER = "mindspeed.patch_utils"

_ENABLED: Optional[List[str]] = None  # feature names enabled by the one successful apply
_NOTES: List[str] = []  # features skipped because MindSpeed patched their symbols first


class MindSpeedOverlapWarning(UserWarning):
    """A feature was skipped: MindSpeed's adaptor already patched the symbols it would patch."""


def mindspeed_available() -> bool:
    """True when a MindSpeed package can be imported (it need not be a working one)."""
    return importlib.util.find_spec("mindspeed") is not None


def import_mindspeed() -> None:
    """Import MindSpeed's own adaptor, explaining the usual installation mistakes."""
    if not mindspeed_available():
        raise PatchError(
            "mindspeed_patches: MindSpeed was requested but is not installed; install it from source, "
            f"from the branch that targets megatron-core {EXPECTED_MEGATRON_CORE}")
    try:
        found = importlib.util.find_spec(MINDSPEED_ADAPTOR) is not None
    except ImportError as e:
        raise PatchError(f"mindspeed_patches: the installed 'mindspeed' package does not import "
                         f"({type(e).__name__}: {e})") from e
    if not found:
        raise PatchError(
            f"mindspeed_patches: the installed 'mindspeed' package has no {MINDSPEED_ADAPTOR}: it is "
            "probably the PyPI placeholder. Uninstall it and install MindSpeed from source, from the "
            f"branch that targets megatron-core {EXPECTED_MEGATRON_CORE}, or leave it uninstalled")
    try:
        importlib.import_module(MINDSPEED_ADAPTOR)
    except Exception as e:
        # A MindSpeed branch written for another megatron-core fails here with a bare ImportError
        # (or an AttributeError from its own patcher) on a megatron symbol that moved.
        first = (str(e).strip().splitlines() or [""])[0]
        raise PatchError(
            f"mindspeed_patches: importing {MINDSPEED_ADAPTOR} failed ({type(e).__name__}: {first}); "
            f"MindSpeed must be the branch for megatron-core {EXPECTED_MEGATRON_CORE} ({version_note()})"
        ) from e


def mindspeed_patched() -> Dict[str, str]:
    """Targets MindSpeed's patch manager holds (dotted name -> its patch), when MindSpeed is loaded."""
    manager_module = sys.modules.get(MINDSPEED_PATCH_MANAGER)
    manager = getattr(manager_module, "MindSpeedPatchesManager", None)
    info = getattr(manager, "patches_info", None) or {}
    out = {}
    for target, patch in info.items():
        if getattr(patch, "is_applied", True) is False:
            continue
        funcs = [getattr(patch, "patch_func", None), *(getattr(patch, "wrappers", None) or [])]
        names = [_describe(f) for f in funcs if f is not None]
        out[str(target)] = "MindSpeed" + (f" ({', '.join(names)})" if names else "")
    return out


def load_mindspeed(required: bool = False) -> bool:
    """Import MindSpeed's adaptor (if installed, or `required`) and declare what it patched foreign
    on the registry. Must run before megatron-vita's own megatron-core fixes are applied.
    Returns whether MindSpeed is loaded."""
    if not required and not mindspeed_available():
        return False
    import_mindspeed()
    REGISTRY.declare_foreign(mindspeed_patched())
    return True


def notes() -> List[str]:
    """One line per feature skipped because MindSpeed patched its symbols first."""
    return list(_NOTES)


def add_arguments(parser: argparse.ArgumentParser,
                  features: Optional[Sequence[Type[Feature]]] = None) -> None:
    """Add the NPU feature flags to a command's parser (the training CLI does this)."""
    FeatureManager(FEATURES if features is None else features).add_arguments(parser)


def apply_for_npu(args: Optional[argparse.Namespace] = None, *,
                  features: Optional[Sequence[Type[Feature]]] = None,
                  strict_version: Optional[bool] = None,
                  use_mindspeed: Optional[bool] = None) -> List[str]:
    """Check versions, import MindSpeed if present, apply the enabled features' patches.

    `args`: a Namespace holding the feature flags (missing ones take their defaults); None
    reads them from `sys.argv`. `features`: the feature classes (default `FEATURES`).
    `use_mindspeed`: None imports MindSpeed when installed; True requires it; False skips it.
    Returns the names of the enabled features. Idempotent: later calls return the first result.
    """
    global _ENABLED
    if _ENABLED is not None:
        return list(_ENABLED)
    check_megatron_core_version(strict_version)
    if use_mindspeed or (use_mindspeed is None and mindspeed_available()):
        load_mindspeed(required=True)
    manager = FeatureManager(FEATURES if features is None else features)
    args = manager.complete_args(args) if args is not None else manager.parse(sys.argv[1:])
    manager.validate(args)
    enabled = [f.name for f in manager.enabled(args) if _register_unless_mindspeed_has(f, args)]
    REGISTRY.apply_patches()
    _ENABLED = enabled
    return list(enabled)


def _register_unless_mindspeed_has(feature: Feature, args: argparse.Namespace) -> bool:
    """Register `feature`'s patches, unless one of its targets is already MindSpeed's (then note it)."""
    foreign = REGISTRY.foreign()
    if foreign:
        probe = PatchRegistry()  # registration is lazy: this only learns the targets
        feature.register_patches(probe, args)
        taken = [t for t in probe.registered() if t in foreign]
        if taken:
            note = (f"mindspeed_patches: {feature.flag} skipped: MindSpeed already patched {', '.join(taken)} "
                    "(its kernel is in place; patching it again would stack two patches on one symbol)")
            _NOTES.append(note)
            warnings.warn(note, MindSpeedOverlapWarning, stacklevel=3)
            return False
    feature.register_patches(REGISTRY, args)
    return True


def is_applied() -> bool:
    return _ENABLED is not None


def remove_all() -> None:
    """Restore every patch on the registry and forget the registrations (tests).

    That includes megatron-vita's own fixes (`megatron_vita.parallel.megatron_patches`, which
    registers them again when applied). MindSpeed's own patches, when it was imported, are not
    undone: it has no removal.
    """
    global _ENABLED
    REGISTRY.clear()
    _ENABLED = None
    _NOTES.clear()
