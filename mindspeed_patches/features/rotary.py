"""`--use-fused-rotary-pos-emb`: RoPE through `torch_npu.npu_rotary_mul`.

megatron-core 0.12.1 applies RoPE inside `Attention.forward` via
`megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb`; without
TransformerEngine's fused RoPE (config.apply_rope_fusion False) both of its paths end in
`_apply_rotary_pos_emb_bshd`: the padded / unpacked one with q, k of [s, b, n, d] and freqs of
[s, 1, 1, d], and the packed (`thd`) one once per document with [len, 1, n, d] and that
document's [len, 1, 1, d] freqs (CP chunks already selected). Both are 4-D SBND calls with
S11D cos / sin, as npu_rotary_mul wants, so this feature wraps that one function, as MindSpeed
does. Calls the kernel cannot take go to megatron's own code: multi-latent attention (it
de-interleaves first) and mscale != 1 (cos / sin would leave the kernel's [-1, 1] range).
"""
from __future__ import annotations

import functools

from mindspeed_patches.features.base import Feature
from mindspeed_patches.registry import PatchRegistry

TARGET = "megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd"


def npu_rotary_pos_emb_wrapper(apply_bshd):
    """megatron's _apply_rotary_pos_emb_bshd with the rotation done by npu_rotary_mul."""

    @functools.wraps(apply_bshd)
    def apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if multi_latent_attention or mscale != 1.0:
            return apply_bshd(t, freqs, rotary_interleaved=rotary_interleaved,
                              multi_latent_attention=multi_latent_attention, mscale=mscale)
        import torch
        import torch_npu

        rot_dim = freqs.shape[-1]
        t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
        out = torch_npu.npu_rotary_mul(t_rot, torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype),
                                       rotary_mode="interleave" if rotary_interleaved else "half")
        return torch.cat((out, t_pass), dim=-1) if t_pass.shape[-1] else out

    return apply_rotary_pos_emb_bshd


class FusedRotaryPosEmb(Feature):
    name = "use-fused-rotary-pos-emb"
    help = "rotary position embedding through torch_npu.npu_rotary_mul"

    def register_patches(self, registry: PatchRegistry, args) -> None:
        registry.register_patch(TARGET, npu_rotary_pos_emb_wrapper,
                                reason="--use-fused-rotary-pos-emb: RoPE (dense and packed thd) runs "
                                       "torch_npu.npu_rotary_mul")
