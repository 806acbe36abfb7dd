"""The one place that picks the layer-spec leaves (core attention, norms) of both transformers.

Model code names no kernel: the LLM's and the ViT's layer specs are built from the leaves chosen
here, from the parallel layout and the backend.
  LLM core attention  CoreAttention (plain torch SDPA, every backend) at CP 1; under context
                      parallelism ContextParallelAttention (ring / Ulysses / hybrid, from the
                      layout), which megatron-core 0.12.1 only offers through TransformerEngine.
  ViT core attention  CoreAttention: the ViT attends within one tile, which never spans CP ranks
                      (each CP rank runs the ViT on the tiles whose tokens it holds).
  norms               RMSNorm (LLM) and LayerNorm (ViT), sequence-parallel aware.
The NPU kernels (npu_fusion_attention, npu_rms_norm) are installed by mindspeed_patches (wrappers
of `select_leaves` swapping in their leaf classes, or patches of these classes' hot paths) on
the npu backend, and on the CPU against the tests' torch_npu emulation. On cuda the platform's
`--use-flash-attn` picks the flash-attn leaf (cuda_leaves.FlashAttention) for the ViT and, at
CP 1, the LLM; without the flag every backend keeps the plain torch leaves. A backend that needs
its own leaf classes adds them in `leaves_for`, nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_vita.config.parallel import ParallelConfig


@dataclass(frozen=True)
class Leaves:
    """The leaf classes of one model build."""

    language_attention: type
    vision_attention: type
    language_norm: type
    vision_norm: type

    def language_layer_spec(self) -> ModuleSpec:
        from megatron_vita.models.language.qwen2 import qwen2_layer_spec

        return qwen2_layer_spec(core_attention=self.language_attention, norm=self.language_norm)

    def vision_layer_spec(self) -> ModuleSpec:
        from megatron_vita.models.vision.internvit import vit_layer_spec

        return vit_layer_spec(core_attention=self.vision_attention, norm=self.vision_norm)


def select_leaves(par: ParallelConfig, backend: Optional[str] = None) -> Leaves:
    """The leaves for this layout on this backend (default: the active platform's, with its kernel flags)."""
    from megatron_vita import platform

    plat = platform.current()
    backend = backend or plat.name
    return leaves_for(par, backend, plat.features if backend == plat.name else ())


def leaves_for(par: ParallelConfig, backend: str, features: Sequence[str] = ()) -> Leaves:
    """The leaves for a layout, a backend and the kernel flags applied (MindSpeed's names)."""
    from megatron_vita.models.common.attention import CoreAttention
    from megatron_vita.models.common.norms import LayerNorm, RMSNorm

    if backend not in ("cpu", "cuda", "npu"):
        raise ValueError(f"unknown backend {backend!r}: cpu, cuda or npu")
    attention = CoreAttention
    if backend == "cuda" and "use-flash-attn" in features:
        from megatron_vita.models.common.cuda_leaves import FlashAttention

        attention = FlashAttention
    language_attention = attention
    if par.cp > 1:
        from megatron_vita.parallel.context.leaf import ContextParallelAttention

        language_attention = ContextParallelAttention
    return Leaves(language_attention=language_attention, vision_attention=attention,
                  language_norm=RMSNorm, vision_norm=LayerNorm)
