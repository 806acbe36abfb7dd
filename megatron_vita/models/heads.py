"""The language-model head: hidden states -> vocab-parallel logits -> logits or per-token loss.

The output layer is column-parallel over the vocabulary (each TP rank holds V/TP rows), so the
loss is megatron's vocab-parallel cross entropy and full logits are only gathered on request.
Hidden states arrive in the sequence-parallel layout when SP is on; the head gathers them
itself so that it can later select positions (supervised tokens in training, the last prompt
token at inference) before the output projection rather than after it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig


def _full_sequence(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[s/tp or s, b, h] -> [s, b, h] entering the vocab-parallel output layer."""
    if sequence_parallel:
        # All-gather forward; reduce-scatter backward (each rank's grad is a partial sum over its vocab shard).
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden)


def vocab_parallel_logits(output_layer: torch.nn.Module, hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[s, b, V/tp] logits of this rank's vocabulary shard."""
    return F.linear(_full_sequence(hidden, sequence_parallel), output_layer.weight)


def language_model_loss(output_layer: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                        loss_mask: Optional[torch.Tensor], config: TransformerConfig) -> torch.Tensor:
    """Per-token cross entropy [b, s] against pre-shifted labels, zero where loss_mask is 0.

    Labels are pre-shifted in the data (labels[t] is the target of position t), so no shift
    happens here; ignored positions (label -100) give exactly zero loss and zero gradient.
    """
    logits = vocab_parallel_logits(output_layer, hidden, config.sequence_parallel)  # [s, b, V/tp]
    if loss_mask is None:
        loss_mask = (labels != -100).float()
    safe_labels = labels.clamp(min=0).transpose(0, 1).contiguous()  # [s, b]
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), safe_labels)  # [s, b]
    return losses.transpose(0, 1) * loss_mask.to(losses.dtype)


def language_model_logits(output_layer: torch.nn.Module, hidden: torch.Tensor, config: TransformerConfig,
                          positions: Optional[torch.Tensor] = None, gather_output: bool = False) -> torch.Tensor:
    """Logits [b, s, V/tp] (or [b, k, ...] at sequence `positions`); vocabulary gathered if asked."""
    sequence_parallel = config.sequence_parallel
    if positions is not None:
        if sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
            sequence_parallel = False
        hidden = hidden[positions]
    logits = vocab_parallel_logits(output_layer, hidden, sequence_parallel)
    if gather_output:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits.transpose(0, 1).contiguous()
