"""Training checkpoints: megatron-core dist checkpoints (torch_dist) in Megatron-LM's layout.

    SAVE/iter_0000100/              a dist checkpoint (any TP/PP/DP can load it)
    SAVE/latest_checkpointed_iteration.txt

The state holds `model` (`model0`, `model1`, ... per virtual-pipeline chunk, as Megatron-LM),
`optimizer` (megatron's sharded optimizer state; the distributed optimizer in the
fully-sharded model space), `opt_param_scheduler`, `rng_state` (per TP/PP rank), `iteration`,
`consumed_samples`, `args`, `model_config` and `data_state` (the loader's resume state, the
same on every DP rank).

Saving is atomic: ranks write into `SAVE/.iter_0000100.partial`, rank 0 renames it into place
after every rank finished, and updates `latest_checkpointed_iteration.txt` last (via a rename),
so an interrupted save never looks like a checkpoint and `latest` always names a complete one.
An iteration damaged afterwards (a `.distcp` or `common.pt` lost or cut short in a copy) is
found before loading, from the files its DCP `.metadata` names; an earlier complete iteration is
loaded only when asked for by number (`--load-iteration`, Megatron-LM's `--ckpt-step`).

Model weights reshard on load (dist checkpointing): a checkpoint saved at one TP/PP loads at
another. Optimizer state (megatron-core 0.12.1 keeps its parameter groups per rank) loads only
into the layout it was saved from; a changed layout is refused with the advice to pass
--no-load-optim, which keeps the weights, the iteration and the data position and starts a fresh
optimizer and LR schedule (as Megatron-LM's flag does).
"""
from __future__ import annotations

import os
import pickle
import shutil
from typing import Any, Dict, List, Optional, Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_vita import platform
from megatron_vita.checkpoint.dist_writer import save_in_process
from megatron_vita.checkpoint.megatron_layout import TRACKER, iteration_dir_name, latest_iteration, saved_iterations
from megatron_vita.checkpoint.safe_load import load_weights_only


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_dir_name(iteration))


def missing_files(path: str) -> List[str]:
    """What a saved iteration lacks: megatron's own files, and every file its DCP metadata names
    (absent, or shorter than the data the metadata places in it). Empty when complete."""
    from megatron_vita.checkpoint.dist_format import read_metadata

    if not os.path.isdir(path):
        return [f"{os.path.basename(path)}/ (no such directory)"]
    missing = [name for name in ("common.pt", "metadata.json", ".metadata")
               if not os.path.isfile(os.path.join(path, name))]
    if ".metadata" in missing:
        return missing
    try:
        metadata = read_metadata(path)  # restricted unpickler: refuses a pickle that would run code
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        return missing + [f".metadata (unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    ends: Dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            missing.append(name)
        elif os.path.getsize(file) < end:
            missing.append(f"{name} (truncated: {os.path.getsize(file)} of {end} bytes)")
    return missing


def resolve_iteration(root: str, requested: Optional[int] = None) -> int:
    """The complete iteration `--load root` loads: `requested` (--load-iteration) or the tracker's.

    Refuses, naming the missing files and the complete iterations there are, when that one is
    incomplete; an earlier complete iteration is loaded only when asked for by number.
    """
    def complete_ones(below: Optional[int] = None) -> List[int]:
        return [it for it in saved_iterations(root) if (below is None or it < below) and not missing_files(
            iteration_dir(root, it))]

    if requested is not None:
        missing = missing_files(iteration_dir(root, requested))
        if missing:
            others = complete_ones()
            raise FileNotFoundError(f"--load {root} --load-iteration {requested}: incomplete, missing "
                                    f"{', '.join(missing)}; complete iterations there: {others or 'none'}")
        return requested
    latest = latest_iteration(root)
    if latest is None:
        others = complete_ones()
        hint = f" (iterations there: {others}; pick one with --load-iteration)" if others else ""
        raise FileNotFoundError(f"--load {root}: no {TRACKER} (not a checkpoint directory, or never saved){hint}")
    missing = missing_files(iteration_dir(root, latest))
    if missing:
        earlier = complete_ones(below=latest)
        advice = (f"the latest complete one is iteration {earlier[-1]}: add --load-iteration {earlier[-1]} to resume "
                  "from it" if earlier else "no earlier complete iteration exists")
        raise FileNotFoundError(f"--load {root}: iteration {latest} (named by {TRACKER}) is incomplete, missing "
                                f"{', '.join(missing)}; {advice}")
    return latest


def _model_keys(n_chunks: int):
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def _model_sharded_state(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    from megatron_vita.parallel.state import virtual_pipeline_rank

    state = {}
    for i, (key, chunk) in enumerate(zip(_model_keys(len(chunks)), chunks)):
        with virtual_pipeline_rank(i):
            state[key] = chunk.sharded_state_dict()
    return state


def _rng_state() -> Dict[str, Any]:
    # The platform's: the CPU generator, the accelerator's (on cuda/npu) and megatron's tracker.
    return platform.current().get_rng_state()


def _rng_object(state) -> ShardedObject:
    return ShardedObject(
        "rng_state", state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _unwrap(chunks):
    return [getattr(c, "module", c) for c in chunks]


def save_checkpoint(root: str, iteration: int, ddp_chunks, optimizer, scheduler, *, args, model_config,
                    data_state: Optional[dict], consumed_samples: int = 0) -> str:
    """Write iteration `iteration` under `root` (all ranks call this); `consumed_samples` so far, as Megatron-LM."""
    final = iteration_dir(root, iteration)
    partial = os.path.join(root, f".iter_{iteration:07d}.partial")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # left by interrupted saves
            if name.startswith(".iter_") and name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(partial)
    torch.distributed.barrier()
    chunks = _unwrap(ddp_chunks)
    state = _model_sharded_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state)

    state.update(
        opt_param_scheduler=scheduler.state_dict() if scheduler is not None else None,
        rng_state=_rng_object(_rng_state()),
        iteration=iteration,
        consumed_samples=int(consumed_samples),
        checkpoint_version=3.0,
        args=args,
        model_config=model_config.to_dict(),
        data_state=data_state,
    )
    # megatron's own writer would fork next to the data pipeline's threads (see dist_writer).
    save_in_process(state, partial)
    torch.distributed.barrier()
    if rank0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))
    torch.distributed.barrier()
    return final


def _check_pickles_are_safe(path: str) -> Dict[str, Any]:
    """megatron reads common.pt and DCP's .metadata with plain pickle: refuse either if it wants
    to run code, before megatron opens them. Returns the (safely loaded) common state."""
    from megatron_vita.checkpoint.dist_format import read_metadata

    common = os.path.join(path, "common.pt")
    state = load_weights_only(common) if os.path.isfile(common) else {}
    read_metadata(path)
    return state


_LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                 "use_distributed_optimizer")


def layout_changes(common: Dict[str, Any], current_args) -> list:
    """How the parallel layout of this run differs from the checkpoint's (empty if unknown or equal)."""
    saved = common.get("args")
    if saved is None or current_args is None:
        return []
    return [f"--{k.replace('_', '-')} {getattr(saved, k, None)} -> {getattr(current_args, k, None)}"
            for k in _LAYOUT_FLAGS if getattr(saved, k, None) != getattr(current_args, k, None)]


def check_resume_layout(root: str, current_args, load_optim: bool, iteration: Optional[int] = None) -> list:
    """Refuse an incomplete iteration, and optimizer state into another layout (it does not reshard),
    with the fix in the message. Returns the layout changes."""
    path = iteration_dir(root, resolve_iteration(root, iteration))
    changes = layout_changes(_check_pickles_are_safe(path), current_args)
    if changes and load_optim:
        raise ValueError(f"--load {path}: the parallel layout changed ({', '.join(changes)}). Model weights reshard, "
                         "the optimizer state does not: add --no-load-optim (or --finetune) to continue with the "
                         "weights and a fresh optimizer")
    return changes


def load_checkpoint(root: str, ddp_chunks, optimizer=None, scheduler=None, *, load_optim: bool = True,
                    load_rng: bool = True, finetune: bool = False, args=None,
                    iteration: Optional[int] = None) -> Dict[str, Any]:
    """Load the latest checkpoint under `root` (or `iteration`) into the chunks (and optimizer/scheduler/RNG).

    Returns {"iteration", "consumed_samples", "data_state", "model_config"}; iteration and
    consumed_samples are 0 and data_state None with `finetune` (weights only, a new run). `args`
    (this run's) detects a changed parallel layout, across which the optimizer state cannot be loaded.
    """
    with_optim = optimizer is not None and load_optim and not finetune
    iteration = resolve_iteration(root, iteration)
    changes = check_resume_layout(root, args, with_optim, iteration)  # also: unsafe pickles
    path = iteration_dir(root, iteration)
    # RNG states are saved per (PP, TP) rank: they only apply to the same layout.
    load_rng = load_rng and not changes
    chunks = _unwrap(ddp_chunks)
    template = _model_sharded_state(chunks)
    if with_optim:
        template["optimizer"] = optimizer.sharded_state_dict(template, is_loading=True)
    if load_rng and not finetune:
        template["rng_state"] = _rng_object(_rng_state())
    state = dist_checkpointing.load(template, path)
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        missing, unexpected = chunk.load_state_dict(state[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{path}: model keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if with_optim:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and with_optim and state.get("opt_param_scheduler"):  # as Megatron-LM's --no-load-optim
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng and not finetune:
        platform.current().set_rng_state(state["rng_state"])
    return {
        "iteration": 0 if finetune else int(state["iteration"]),
        # Checkpoints written before the count was saved resume counting from 0.
        "consumed_samples": 0 if finetune else int(state.get("consumed_samples", 0)),
        "data_state": None if finetune else state.get("data_state"),
        "model_config": state.get("model_config"),
    }
