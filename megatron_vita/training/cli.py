"""`megatron-vita train`: a Long-VITA stage from a recipe plus Megatron-style flags.

Under torchrun (RANK/WORLD_SIZE set) every launched process trains as one rank. Otherwise the
command spawns `--nproc-per-node` local ranks itself (default TP*PP*CP, i.e. DP=1), which is
what the CPU demo and laptops use; a rank that fails stops the whole run with its traceback.
"""
from __future__ import annotations

import argparse
import math
import os

from megatron_vita.training import config as train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_config.add_arguments(parser)


def build_config(args: argparse.Namespace) -> train_config.TrainConfig:
    """Recipe + stage defaults + flags -> the run's TrainConfig (validated before any process starts)."""
    from megatron_vita.data.recipe import load_recipe

    data_root = args.data_root or "."
    recipe = load_recipe(args.recipe, data_root)
    stage = args.stage if args.stage is not None else (recipe.stage or None)
    cfg = train_config.merge(args, recipe.training, recipe.path, train_config.stage_defaults(stage))
    cfg.stage, cfg.data_root = stage, data_root
    if cfg.lr is None:
        raise ValueError(f"no learning rate: pass --lr, set training.lr in {recipe.path}, or pick --stage 1-4")
    if cfg.min_lr is None:
        cfg.min_lr = 0.0
    if cfg.save_interval and not cfg.save:
        raise ValueError("--save-interval needs --save")
    for path, flag in ((cfg.load, "--load"), (cfg.init_hf, "--init-hf"), (cfg.init_llm, "--init-llm"),
                       (cfg.init_vit, "--init-vit")):
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {path} is not a directory")
    if cfg.finetune and not cfg.load:
        raise ValueError("--finetune needs --load")
    if cfg.load:
        from megatron_vita.training.checkpointing import check_resume_layout

        check_resume_layout(cfg.load, train_config.to_namespace(cfg),
                            load_optim=not (cfg.no_load_optim or cfg.finetune))
    return cfg


def run(args: argparse.Namespace) -> int:
    from megatron_vita import platform
    from megatron_vita.training.loop import rank_main, train

    cfg = build_config(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        platform.init_distributed(platform.activate(args.backend))
        train(cfg)
        return 0
    platform.spawn(rank_main, cfg.world_size, cfg, timeout=math.inf, backend=args.backend)
    if cfg.export_hf:
        export_hf(cfg)
    return 0


def export_hf(cfg: train_config.TrainConfig) -> None:
    """Write the final checkpoint in the HF layout (through the checkpoint converter)."""
    from megatron_vita.checkpoint.convert import convert

    if not cfg.save:
        raise ValueError("--export-hf needs --save (the HF export is converted from the saved checkpoint)")
    convert(src_format="megatron", dst_format="hf", src=cfg.save, dst=cfg.export_hf, force=True,
            tokenizer=cfg.tokenizer)


def main_torchrun(argv=None) -> int:
    """Entry for examples/pretrain_vita.py under torchrun (Megatron-LM's pretrain_*.py habit)."""
    parser = argparse.ArgumentParser(description="Long-VITA training (torchrun entry)")
    parser.add_argument("--backend", choices=["auto", "cpu", "cuda", "npu"], default=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)
