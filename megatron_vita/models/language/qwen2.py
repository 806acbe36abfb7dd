"""Qwen2.5 as a megatron-core GPTModel: config, layer spec, and a forward with our LM head.

Qwen2 in megatron terms: GQA (num_query_groups), bias on the fused QKV only, RMSNorm, SwiGLU
(fc1 rows = [gate; up]), RoPE base 1e6 (not interleaved), untied output layer. The layer spec's
leaves (core attention, norm) are the swap points for backends and context parallelism.

`Qwen2Model.forward` replaces GPTModel's tail: instead of always producing full logits it hands
the final hidden states to `models.heads`, which computes either logits or the per-token loss.
Packed documents use megatron's `thd` convention (PackedSeqParams with cu_seqlens), so RoPE
restarts at every document boundary exactly as reset position ids do in Hugging Face.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_vita.config.model import LanguageConfig
from megatron_vita.config.parallel import ParallelConfig
from megatron_vita.models import heads
from megatron_vita.models.common.attention import CoreAttention
from megatron_vita.models.common.norms import RMSNorm
from megatron_vita.models.common.specs import PLAIN_OPS, pre_norm_layer_spec


def language_transformer_config(
    lm: LanguageConfig,
    par: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    use_cpu_initialization: bool = True,
    **overrides,
) -> TransformerConfig:
    """megatron TransformerConfig for the Qwen2 decoder under a parallel layout.

    `use_cpu_initialization` is megatron's: parameters initialised on the host (TP-independent
    draws from the CPU generator) or on the current device; the builder asks the platform
    (`platform.placement.host_initialization`), this module does not know the backend."""
    kw = dict(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.kv_channels,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sequence_parallel,
        num_layers_in_first_pipeline_stage=par.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=par.num_layers_in_last_pipeline_stage,
        normalization="RMSNorm",
        layernorm_epsilon=lm.rms_norm_eps,
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        **PLAIN_OPS,
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        init_method_std=0.02,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        # gloo matches batched p2p ops in the wrong order when prev == next rank (PP=2 + VPP);
        # unbatched send/recv is correct everywhere and costs little.
        batch_p2p_comm=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def qwen2_layer_spec(core_attention=CoreAttention, norm=RMSNorm) -> ModuleSpec:
    """One Qwen2 decoder layer: causal attention, RMSNorm."""
    return pre_norm_layer_spec(TransformerLayer, AttnMaskType.causal, core_attention, norm)


def qwen2_block_spec(config: TransformerConfig, layer_spec: Optional[ModuleSpec] = None,
                     norm=None) -> TransformerBlockSubmodules:
    """This pipeline chunk's layers plus the final norm (megatron reads the chunk from global state).

    The final norm is the layers' norm leaf unless `norm` is given, so a norm chosen by
    `select_leaves` (a fused kernel's class) reaches the last one too."""
    spec = layer_spec or qwen2_layer_spec(norm=norm or RMSNorm)
    norm = norm or spec.submodules.input_layernorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=norm)


class Qwen2Model(GPTModel):
    """GPTModel whose tail is `models.heads` (logits or per-token loss, optionally masked)."""

    def __init__(self, config: TransformerConfig, lm: LanguageConfig, vocab_size: int, pre_process: bool = True,
                 post_process: bool = True, layer_spec: Optional[ModuleSpec] = None, mask_logits: bool = True):
        super().__init__(
            config=config,
            transformer_layer_spec=qwen2_block_spec(config, layer_spec),
            vocab_size=vocab_size,
            max_sequence_length=lm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=lm.rope_theta,
            # The combined model writes visual features into the full-length embeddings
            # first and scatters them to sequence-parallel ranks itself.
            scatter_embedding_sequence_parallel=False,
        )
        # Training loss from logits at supervised positions only (heads.masked_language_model_loss).
        self.mask_logits = mask_logits

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_context=None,
        runtime_gather_output: Optional[bool] = None,
        logits_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Returns hidden states (not the last stage), losses (labels given) or logits.

        Losses are per supervised token [k] with the logits mask (the default when loss_mask is
        given), else per position [b, s] with zeros where unsupervised: their sums agree.

        `decoder_input` [s, b, h] (already sequence-parallel scattered when SP is on) comes from
        the combined model; on stages without the embedding it is None.
        """
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
        rotary_seq_len = self.rotary_pos_emb.get_rotary_seq_len(
            inference_context, self.decoder, decoder_input, self.config, packed_seq_params)
        rotary_pos_emb = self.rotary_pos_emb(
            rotary_seq_len, packed_seq=packed_seq_params is not None and packed_seq_params.qkv_format == "thd")
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return hidden
        if labels is not None:
            if self.mask_logits and loss_mask is not None:
                return heads.masked_language_model_loss(self.output_layer, hidden, labels, loss_mask, self.config)
            return heads.language_model_loss(self.output_layer, hidden, labels, loss_mask, self.config)
        return heads.language_model_logits(self.output_layer, hidden, self.config, positions=logits_positions,
                                           gather_output=bool(runtime_gather_output))
