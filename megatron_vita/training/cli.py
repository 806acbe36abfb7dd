"""`megatron-vita train`: a Long-VITA stage from a recipe plus Megatron-style flags.

Under torchrun (RANK/WORLD_SIZE set) every launched process trains as one rank. Otherwise the
command spawns `--nproc-per-node` local ranks itself (default TP*PP*CP, i.e. DP=1), which is
what the CPU demo and laptops use; a rank that fails stops the whole run with its traceback.
Every rank applies the config's kernel flags (`--use-flash-attn`, ...: TrainConfig.features)
through platform.activate. Either way the whole configuration is checked first
(training.preflight), so a bad flag, path or checkpoint is one line per problem before any rank
starts, and `--export-hf` is written after the last save (under torchrun by rank 0, once every
rank left the process group).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional

from megatron_vita.training import config as train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_config.add_arguments(parser)


def build_config(args: argparse.Namespace, world_size: Optional[int] = None) -> train_config.TrainConfig:
    """Recipe + stage defaults + flags -> the run's TrainConfig, checked as a whole before any process starts.

    `world_size` defaults to torchrun's WORLD_SIZE, else the ranks `train` spawns. Every problem
    found is reported at once (ConfigError, one line each).
    """
    from megatron_vita.data.recipe import load_recipe
    from megatron_vita.training import preflight

    data_root = args.data_root or "."
    recipe = load_recipe(args.recipe, data_root)
    stage = args.stage if args.stage is not None else (recipe.stage or None)
    cfg = train_config.merge(args, recipe.training, recipe.path, train_config.stage_defaults(stage))
    cfg.stage, cfg.data_root = stage, data_root
    if cfg.optim.lr is None:
        raise ValueError(f"no learning rate: pass --lr, set training.lr in {recipe.path}, or pick --stage 1-4")
    preflight.check(cfg, recipe, preflight.launch_world_size(cfg) if world_size is None else world_size,
                    getattr(args, "backend", None))
    return cfg


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(args: argparse.Namespace) -> int:
    from megatron_vita import platform
    from megatron_vita.training.loop import rank_main, train

    cfg = build_config(args)
    if under_torchrun():
        platform.init_distributed(platform.activate(args.backend, features=cfg.features))
        train(cfg)
        finish_torchrun(cfg)
        return 0
    platform.spawn(rank_main, cfg.world_size, cfg, timeout=math.inf, backend=args.backend, features=cfg.features)
    if cfg.export_hf:
        export_hf(cfg)
    return 0


def finish_torchrun(cfg: train_config.TrainConfig) -> None:
    """Leave the process group once every rank is done; then rank 0 alone writes the HF export.

    The export runs outside any collective (it may take minutes for a large model, longer than a
    barrier should wait); the other ranks exit and torchrun waits for rank 0.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    dist.barrier()  # every rank returned from train(): the last save is published
    dist.destroy_process_group()
    if cfg.export_hf and rank == 0:
        export_hf(cfg)


def export_hf(cfg: train_config.TrainConfig) -> None:
    """Write the final checkpoint in the HF layout (through the checkpoint converter)."""
    from megatron_vita.checkpoint.convert import convert

    convert(src_format="megatron", dst_format="hf", src=cfg.save, dst=cfg.export_hf, force=True,
            tokenizer=cfg.tokenizer)
    print(f"> HF export: {cfg.export_hf}", flush=True)


def main_torchrun(argv=None) -> int:
    """Entry for examples/pretrain_vita.py under torchrun (Megatron-LM's pretrain_*.py habit):
    `megatron-vita train` with the same flags, backend selection and error lines."""
    import sys

    from megatron_vita.cli import main

    return main(["train", *(sys.argv[1:] if argv is None else argv)])
