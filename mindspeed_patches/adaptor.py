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

A second call is a no-op. `remove_all()` undoes everything this module applied (for tests).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import List, Optional, Sequence, Type

from mindspeed_patches.features import FEATURES, Feature, FeatureManager
from mindspeed_patches.registry import (
    EXPECTED_MEGATRON_CORE,
    REGISTRY,
    PatchError,
    check_megatron_core_version,
    version_note,
)

MINDSPEED_ADAPTOR = "mindspeed.megatron_adaptor"

_ENABLED: Optional[List[str]] = None  # feature names enabled by the one successful apply


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
    except ImportError as e:
        # A MindSpeed branch written for another megatron-core fails here with a bare ImportError.
        raise PatchError(
            f"mindspeed_patches: importing {MINDSPEED_ADAPTOR} failed ({type(e).__name__}: {e}); "
            f"MindSpeed must be the branch for megatron-core {EXPECTED_MEGATRON_CORE} ({version_note()})"
        ) from e


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
        import_mindspeed()
    manager = FeatureManager(FEATURES if features is None else features)
    enabled = manager.run(REGISTRY, args=args, argv=sys.argv[1:] if args is None else ())
    REGISTRY.apply_patches()
    _ENABLED = enabled
    return list(enabled)


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
