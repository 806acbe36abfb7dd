"""Optimizer, per-parameter learning rates and the LR schedule for Long-VITA training.

Stage 2 trains the ViT at a tenth of the LR with layer-wise decay: ViT layer l (1..L) gets
lr_mult = 0.1 * 0.9^(L+1-l), its embeddings (patch conv, CLS, positions) count as layer 0.
megatron-core 0.12.1 groups parameters by a single optional LR multiplier, so its grouping is
refined here: each parameter may carry `lr_mult`, and groups are split by that value (the
distributed optimizer shards whatever groups it is given). The schedule is megatron's
OptimizerParamScheduler: linear warmup then cosine decay to min_lr, counted in iterations.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Sequence

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_vita.parallel import megatron_patches
from megatron_vita.training.config import OptimConfig

_VIT_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def vision_lr_multipliers(vision_model: torch.nn.Module, num_layers: int, lr_mult: float,
                          layer_decay: float) -> Dict[str, float]:
    """lr multiplier of every ViT parameter (by name inside the ViT)."""
    out = {}
    for name, _ in vision_model.named_parameters():
        m = _VIT_LAYER.match(name)
        layer = int(m.group(1)) + 1 if m else 0
        out[name] = lr_mult * layer_decay ** (num_layers + 1 - layer)
    return out


def assign_vision_lr_multipliers(chunks: Sequence[torch.nn.Module], lr_mult: float, layer_decay: float) -> None:
    """Tag the ViT's parameters with `lr_mult` (read when the optimizer groups are built)."""
    for chunk in chunks:
        vit = getattr(chunk, "vision_model", None)
        if vit is None:
            continue
        mults = vision_lr_multipliers(vit, len(vit.decoder.layers), lr_mult, layer_decay)
        for name, p in vit.named_parameters():
            p.lr_mult = mults[name]


def _split_groups_by_param_lr_mult(groups: List[dict]) -> List[dict]:
    out = []
    for group in groups:
        by_mult: "OrderedDict[float, list]" = OrderedDict()
        for p in group["params"]:
            by_mult.setdefault(float(getattr(p, "lr_mult", 1.0)), []).append(p)
        for mult, params in by_mult.items():
            out.append(dict(group, params=params, lr_mult=group.get("lr_mult", 1.0) * mult))
    return out


def param_groups_by_lr_mult_wrapper(get_param_groups):
    """megatron's `_get_param_groups`, each group split by its parameters' `lr_mult` (a patch of
    megatron-core, registered in megatron_vita.parallel.megatron_patches; without `lr_mult`
    the groups are megatron's)."""

    def get_param_groups_by_lr_mult(*args, **kwargs):
        return _split_groups_by_param_lr_mult(get_param_groups(*args, **kwargs))

    return get_param_groups_by_lr_mult


def build_optimizer(ddp_chunks: Sequence[torch.nn.Module], optim: OptimConfig, use_distributed_optimizer: bool = False,
                    bf16: bool = False):
    """megatron's Adam (distributed or not: the layout's choice), with per-parameter LR multipliers honoured."""
    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    megatron_patches.require("per-parameter-lr-mult")
    return get_megatron_optimizer(config, list(ddp_chunks))


def build_scheduler(optimizer, optim: OptimConfig, train_iters: int) -> OptimizerParamScheduler:
    """Warmup (linear from 0) then decay to min_lr over the run, stepped once per iteration."""
    warmup = int(round(optim.lr_warmup_fraction * train_iters))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(train_iters, warmup + 1), lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(train_iters, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def param_group_lrs(optimizer) -> List[Dict[str, float]]:
    """(lr, lr_mult, number of parameters) per group, for logging and tests."""
    return [{"lr": g["lr"], "lr_mult": g.get("lr_mult", 1.0), "params": len(g["params"])}
            for g in optimizer.param_groups]
