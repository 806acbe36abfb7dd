"""The combined Long-VITA model on megatron-core: ViT -> projector -> scatter -> Qwen2 -> head.

Visual features overwrite the embeddings of the context tokens (<IMG_CONTEXT>, <VID_CONTEXT>,
<PATCH_CONTEXT>) at the positions given by `image_indices` ([2, n_tiles, T]: batch index and
sequence position of every feature token, the released HF argument), or, when absent, at the
context tokens found in `input_ids` in row-major order. A batch may hold no image, several
images (each a thumbnail plus tiles) or video frames: to the model they are all tiles.

Pipeline parallelism: the ViT and projector live with the embedding on the first stage (first
virtual chunk); later stages receive hidden states. Sequence parallelism: the embeddings are
completed at full length, then scattered to the SP ranks. Context parallelism: each CP rank
passes only its own tokens and the tiles whose tokens it holds, with local positions.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vita.config.model import ModelConfig
from megatron_vita.models.common.visual_tokens import context_token_indices
from megatron_vita.models.language.qwen2 import Qwen2Model
from megatron_vita.models.projector.projector import VisionProjector
from megatron_vita.models.vision.internvit import InternViTModel, vision_transformer_config


def scatter_features(embeddings: torch.Tensor, features: torch.Tensor, image_indices: torch.Tensor) -> torch.Tensor:
    """Write features [n, T, h] into embeddings [s, b, h] at image_indices [2, n, T] (out of place).

    A negative sequence index skips that feature: under context parallelism a tile straddling
    two ranks' shares is encoded on both, and each writes only the tokens it holds."""
    b_idx, s_idx = image_indices[0].reshape(-1), image_indices[1].reshape(-1)
    flat = features.reshape(-1, features.shape[-1]).to(embeddings.dtype)
    if flat.shape[0] != b_idx.numel():
        raise ValueError(f"{features.shape[0]} tiles x {features.shape[1]} features do not match image_indices "
                         f"{tuple(image_indices.shape)}")
    here = s_idx >= 0
    if not bool(here.all()):
        b_idx, s_idx, flat = b_idx[here], s_idx[here], flat[here]
    return embeddings.index_put((s_idx, b_idx), flat)


class LongVITAModel(MegatronModule):
    """One pipeline chunk of Long-VITA (the whole model when PP = 1)."""

    def __init__(
        self,
        model_config: ModelConfig,
        language_config: TransformerConfig,
        vocab_size: int,
        pre_process: bool = True,
        post_process: bool = True,
        language_layer_spec: Optional[ModuleSpec] = None,
        vision_layer_spec: Optional[ModuleSpec] = None,
        mask_logits: bool = True,
    ):
        super().__init__(config=language_config)
        self.model_config = model_config
        self.pre_process = pre_process
        self.post_process = post_process
        # Read by megatron's schedules and finalize_model_grads.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.vision_model = self.vision_projection = None
        if pre_process:
            vision_config = vision_transformer_config(model_config.vision, language_config)
            self.vision_model = InternViTModel(vision_config, model_config.vision, vision_layer_spec)
            self.vision_projection = VisionProjector(vision_config, model_config)
        self.language_model = Qwen2Model(language_config, model_config.language, vocab_size,
                                         pre_process=pre_process, post_process=post_process,
                                         layer_spec=language_layer_spec, mask_logits=mask_logits)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def freeze(self, vision: bool = False, projector: bool = False, language: bool = False) -> None:
        """Stop gradients for whole components (before wrapping in DDP, which skips frozen params)."""
        for flag, module in ((vision, self.vision_model), (projector, self.vision_projection),
                             (language, self.language_model)):
            if flag and module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
              pixel_values: Optional[torch.Tensor], image_indices: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings [s, b, h] with visual features written in, SP-scattered if SP is on."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if image_indices is None:
                image_indices = context_token_indices(input_ids, self.model_config.tokens.context_ids,
                                                      self.model_config.num_image_token)
            features = self.vision_projection(self.vision_model(pixel_values))
            emb = scatter_features(emb, features, image_indices.to(emb.device))
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_indices: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_context=None,
        runtime_gather_output: Optional[bool] = None,
        logits_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Losses when labels are given (see Qwen2Model.forward), else logits; hidden states off the last stage."""
        decoder_input = self.embed(input_ids, position_ids, pixel_values, image_indices) if self.pre_process else None
        return self.language_model(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            loss_mask=loss_mask, packed_seq_params=packed_seq_params, inference_context=inference_context,
            runtime_gather_output=runtime_gather_output, logits_positions=logits_positions,
        )
