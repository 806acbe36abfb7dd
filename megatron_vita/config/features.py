"""The kernel feature flags (`--use-flash-attn`, `--use-fused-rmsnorm`, ...) as command-line flags.

The flags are MindSpeed's: each names a `mindspeed_patches` feature (`mindspeed_patches.FEATURES`,
one class per NPU kernel); `CUDA_FEATURES` lists the flags with a CUDA meaning and what they
need. Here: their names, adding them to a parser and reading them back, all without torch (so
`--help` stays light). Which backend may run which flag is the platform's decision
(`megatron_vita.platform.features.feature_problems`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

# Flag (without '--') -> (module it needs, pip requirement that provides it) on --backend cuda.
CUDA_FEATURES: Dict[str, Tuple[str, str]] = {
    "use-flash-attn": ("flash_attn", "flash-attn (pip install 'megatron-vita[gpu]')"),
}


def normalize(name: str) -> str:
    """'--use-fused-rmsnorm' / 'use_fused_rmsnorm' -> 'use-fused-rmsnorm'."""
    return name.strip().lstrip("-").replace("_", "-")


def npu_feature_names() -> List[str]:
    """The flag names of mindspeed_patches.FEATURES, in their order."""
    from mindspeed_patches.features import FEATURES

    return [cls.name for cls in FEATURES]


def known_feature_names() -> List[str]:
    """Every kernel flag a command accepts: the NPU features, then CUDA-only ones not among them."""
    names = npu_feature_names()
    return names + [n for n in CUDA_FEATURES if n not in names]


def enabled_features(args, names: Optional[Sequence[str]] = None) -> List[str]:
    """The kernel flags switched on in an argparse Namespace, as flag names (without '--')."""
    names = known_feature_names() if names is None else names
    return [n for n in names if getattr(args, n.replace("-", "_"), False)]


def add_feature_arguments(parser) -> None:
    """Add every kernel flag to a command's parser: the NPU features' own (with their options)
    and the CUDA-only ones that no NPU feature defines (yet)."""
    import mindspeed_patches

    mindspeed_patches.add_arguments(parser)
    existing = set(parser._option_string_actions)
    for name in CUDA_FEATURES:
        if f"--{name}" not in existing:
            parser.add_argument(f"--{name}", action="store_true", default=False,
                                help="CUDA: flash-attn attention leaf (needs flash-attn)")
