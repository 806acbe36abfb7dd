"""The language-model head: hidden states -> vocab-parallel logits -> logits or per-token loss.

The output layer is column-parallel over the vocabulary (each TP rank holds V/TP rows), so the
loss is megatron's vocab-parallel cross entropy and full logits are only gathered on request.

The logits-masked head (Long-VITA's, needed at 1M tokens where full logits would take 319 GB)
selects positions BEFORE the output projection: Z_m = H[m] W^T is k x V instead of S x V, and
autograd gives dH = scatter_m(dZ_m W), dW = dZ_m^T H[m]. Under sequence parallelism each TP
rank selects from its own slice of the sequence and only the k selected rows are gathered
(never the full [S, b, h]). Labels are pre-shifted in the data, so selection and targets line
up by construction (the original shifted after selecting, losing each answer's first token).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig


def _full_sequence(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[s/tp or s, b, h] -> [s, b, h] entering the vocab-parallel output layer."""
    if sequence_parallel:
        # All-gather forward; reduce-scatter backward (each rank's grad is a partial sum over its vocab shard).
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden)


_WGRAD_ROWS = 1024  # rows per fp32 accumulation step: bounds the fp32 copies of activations/grads


class _VocabProjection(torch.autograd.Function):
    """x @ W^T whose weight gradient goes straight into megatron DDP's fp32 `main_grad` buffer.

    Megatron's gradient-accumulation fusion (TE/apex on GPU, npu_matmul_add_fp32 on NPU) does the
    same: main_grad += dZ^T x without materialising a separate [V, h] gradient. Here it is plain
    torch (addmm_ in row chunks), so it runs on every backend; without a main_grad (no DDP) the
    ordinary gradient is returned.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x.matmul(weight.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad.matmul(weight)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            return grad_x, g2.t().matmul(x2)
        for start in range(0, g2.shape[0], _WGRAD_ROWS):
            rows = slice(start, start + _WGRAD_ROWS)
            main_grad.addmm_(g2[rows].t().to(main_grad.dtype), x2[rows].to(main_grad.dtype))
        if hasattr(weight, "grad_added_to_main_grad"):
            # As megatron's fused path: DDP's hook must skip its own add; a placeholder gradient
            # keeps the hook running on the backward thread.
            weight.grad_added_to_main_grad = True
            return grad_x, torch.empty_like(weight)
        return grad_x, None


def vocab_parallel_logits(output_layer: torch.nn.Module, hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[s, b, V/tp] logits of this rank's vocabulary shard."""
    return _VocabProjection.apply(_full_sequence(hidden, sequence_parallel), output_layer.weight)


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


def _gather_rows_from_tp(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate each TP rank's rows (counts may differ) in rank order, with autograd.

    Pads every rank's rows to the largest count so megatron's sequence-parallel gather (all-gather
    forward, reduce-scatter backward) can be used, then drops the padding.
    """
    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = torch.empty(tp, dtype=torch.long, device=rows.device)
    torch.distributed.all_gather_into_tensor(counts, count, group=group)
    longest = int(counts.max())
    padded = F.pad(rows, [0, 0] * (rows.dim() - 1) + [0, longest - rows.shape[0]])
    if rows.is_floating_point():
        gathered = tensor_parallel.gather_from_sequence_parallel_region(padded, tensor_parallel_output_grad=True)
    else:
        gathered = torch.empty((tp * longest,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
    keep = torch.cat([torch.arange(r * longest, r * longest + int(c), device=rows.device)
                      for r, c in enumerate(counts.tolist())])
    return gathered[keep]


def masked_language_model_loss(output_layer: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                               loss_mask: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """Cross entropy [k] at the k supervised positions only (loss_mask > 0), in [s, b] order.

    Its sum equals the sum of `language_model_loss` (tested), at O(k V) memory instead of O(S V).
    """
    mask = loss_mask.transpose(0, 1) > 0  # [s, b]
    targets = labels.transpose(0, 1)
    if config.sequence_parallel:
        rank = ps.get_tensor_model_parallel_rank()
        local = hidden.shape[0]
        mask = mask[rank * local:(rank + 1) * local]
        targets = targets[rank * local:(rank + 1) * local]
    rows, row_targets = hidden[mask], targets[mask]  # [k_local, h], [k_local]
    if config.sequence_parallel:
        rows, row_targets = _gather_rows_from_tp(rows), _gather_rows_from_tp(row_targets)
    else:
        rows = tensor_parallel.copy_to_tensor_model_parallel_region(rows)
    logits = _VocabProjection.apply(rows, output_layer.weight).unsqueeze(1)  # [k, 1, V/tp]
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), row_targets.unsqueeze(1))
    return losses.squeeze(1)


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
