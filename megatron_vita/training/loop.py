"""The training run of one rank: build, initialise, resume, iterate, log, save.

Order matters for exact resume: model -> initial weights (HF or random) -> stage freezing ->
DDP -> optimizer -> scheduler -> `--load` (model, optimizer, scheduler, RNG, data state, consumed
samples) -> loader built from the saved data state. Every iteration then consumes exactly the
micro-batches an uninterrupted run would have (the loader's state is global, not per worker), so
losses after a resume equal those of a run that never stopped, and the consumed-samples count
continues from the checkpoint's, as in Megatron-LM.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from megatron_vita.config import ModelConfig, ParallelConfig
from megatron_vita.training.config import TrainConfig, to_namespace


def _micro_batches_per_step(cfg: TrainConfig, dp: int) -> int:
    per_step = cfg.micro_batch_size * dp
    if cfg.global_batch_size < 1 or cfg.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {cfg.global_batch_size} is not a positive multiple of "
                         f"--micro-batch-size {cfg.micro_batch_size} x data-parallel size {dp}")
    return cfg.global_batch_size // per_step


def _pin_batches(par: ParallelConfig) -> bool:
    """Pin loader batches when they are what goes to the device: on an accelerator, without
    context parallelism (a CP rank's share is cut out on the host first, into fresh memory)."""
    from megatron_vita.platform import placement

    return placement.pin_memory_helps() and par.cp == 1


def setup_model_and_optimizer(cfg: TrainConfig, model_config: ModelConfig, par: ParallelConfig):
    """This rank's DDP-wrapped chunks, optimizer and LR scheduler, initialised as the stage says.

    Megatron's process groups must exist. Initial weights: --init-hf, else megatron's random init
    (--load is applied afterwards by the caller). Frozen modules get no gradient buffers. The
    chunks are built on the platform's device (the builder), before DDP allocates its buffers there.
    """
    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import PartsSource, load_hf_weights
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.training.engine import wrap_ddp
    from megatron_vita.training.optimizer import assign_vision_lr_multipliers, build_optimizer, build_scheduler

    chunks = build_model_chunks(model_config, par, BuildOptions(
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers, logits_mask=not cfg.no_logits_mask,
        use_cpu_initialization=cfg.use_cpu_initialization or None))
    if cfg.init_hf:
        load_hf_weights(chunks, HFSource(cfg.init_hf, model_config), model_config, par)
    elif cfg.init_llm or cfg.init_vit:
        if not (cfg.init_llm and cfg.init_vit):
            raise ValueError("--init-llm and --init-vit go together (the LLM and the ViT of stage 1)")
        load_hf_weights(chunks, PartsSource(cfg.init_llm, cfg.init_vit, model_config), model_config, par,
                        missing_ok=("vision_projection.",))
    for chunk in chunks:
        chunk.freeze(vision=bool(cfg.freeze_vision), projector=bool(cfg.freeze_projector),
                     language=bool(cfg.freeze_language))
    assign_vision_lr_multipliers(chunks, cfg.vision_lr_mult or 1.0, cfg.vision_layer_decay or 1.0)
    ddp = wrap_ddp(chunks, par.use_distributed_optimizer)
    optimizer = build_optimizer(ddp, cfg.optim, use_distributed_optimizer=par.use_distributed_optimizer, bf16=cfg.bf16)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train_iters)
    return ddp, optimizer, scheduler


def train(cfg: TrainConfig) -> Dict[str, float]:
    """Run on every rank (process group already initialised). Returns the last iteration's stats."""
    from megatron_vita import platform
    from megatron_vita.data.loader import build_train_loader
    from megatron_vita.data.recipe import load_recipe
    from megatron_vita.data.template import load_tokenizer
    from megatron.core import parallel_state

    from megatron_vita.parallel.state import destroy_parallel, initialize_parallel
    from megatron_vita.training import checkpointing
    from megatron_vita.training.engine import train_step
    from megatron_vita.training.monitor import TrainLogger
    from megatron_vita.training.preflight import resolve_model, run_layout

    plat = platform.current()
    world = torch.distributed.get_world_size()
    recipe = load_recipe(cfg.recipe, cfg.data_root)
    if cfg.seq_length is not None:
        recipe.seq_length = cfg.seq_length
    tokenizer = load_tokenizer(cfg.tokenizer or recipe.resolve(cfg.data_root, recipe.tokenizer or "tokenizer"))
    model_config = resolve_model(cfg, recipe, tokenizer)
    par = run_layout(cfg, model_config, world, recipe.seq_length)  # checked before launch too; guards direct callers
    info = initialize_parallel(par, cfg.seed)
    n_micro = _micro_batches_per_step(cfg, info.dp_size)
    try:
        ddp, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config, par)
        start, consumed, data_state = 0, 0, None
        if cfg.load:
            loaded = checkpointing.load_checkpoint(cfg.load, ddp, optimizer, scheduler,
                                                   load_optim=not cfg.no_load_optim, load_rng=not cfg.no_load_rng,
                                                   finetune=cfg.finetune, args=to_namespace(cfg),
                                                   iteration=cfg.load_iteration)
            start, consumed, data_state = loaded["iteration"], loaded["consumed_samples"], loaded["data_state"]
            if cfg.finetune or cfg.no_load_optim:
                optimizer.reload_model_params()
        loader = build_train_loader(recipe, tokenizer=tokenizer, model_config=model_config, data_root=cfg.data_root,
                                    seed=cfg.seed, dp_rank=info.dp_rank, dp_size=info.dp_size,
                                    micro_batch_size=cfg.micro_batch_size, num_workers=cfg.num_workers,
                                    state=data_state, dp_group=parallel_state.get_data_parallel_group(),
                                    pack_align=par.cp_sequence_multiple, pin_memory=_pin_batches(par))
        log = TrainLogger(cfg, plat, start=start, consumed=consumed)
        log.banner(model_config, par, info, n_micro, [m.module for m in ddp], optimizer)
        last: Dict[str, float] = {}
        for iteration in range(start + 1, cfg.train_iters + 1):
            t0 = time.perf_counter()
            micro = [next(loader) for _ in range(n_micro)]
            result = train_step(ddp, optimizer, micro)
            scheduler.step(increment=1)
            last = log.iteration(iteration, result, micro, optimizer, time.perf_counter() - t0)
            if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < cfg.train_iters:
                checkpointing.save_checkpoint(cfg.save, iteration, ddp, optimizer, scheduler, args=to_namespace(cfg),
                                              model_config=model_config, data_state=loader.state_dict(),
                                              consumed_samples=log.consumed)
        if cfg.save and cfg.train_iters > start:
            checkpointing.save_checkpoint(cfg.save, cfg.train_iters, ddp, optimizer, scheduler,
                                          args=to_namespace(cfg), model_config=model_config,
                                          data_state=loader.state_dict(), consumed_samples=log.consumed)
        log.finish(loader.stats())
        loader.close()
        return last
    finally:
        destroy_parallel()


def rank_main(rank: int, world: int, cfg: TrainConfig) -> Optional[Dict[str, float]]:
    """Entry of a rank spawned by `megatron-vita train` (gloo/nccl/hccl group already up)."""
    return train(cfg)
