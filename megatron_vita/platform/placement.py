"""Where tensors live: model chunks, batches and collectives' tensors follow the platform's device.

The backend (`platform.current()`) names the device; this module is the one place that turns
that into placement decisions, so model, training and inference code ask here instead of
branching on cpu / cuda / npu:

 - `device()`: the device of this process (cpu, `cuda:LOCAL_RANK`, `npu:LOCAL_RANK`).
 - `host_initialization` / `building`: how megatron-core initialises parameters. Megatron-LM
   builds them directly on the current device unless `--use-cpu-initialization`; so do we on an
   accelerator: no host copy of a multi-billion-parameter shard, no host->device transfer, and
   the draws come from the accelerator's generator and megatron's tensor-parallel RNG tracker,
   both seeded by `Platform.manual_seed` before the build, so a fresh init is reproducible for a
   given seed, layout and device type. On the host (cpu) the parameters are initialised by
   megatron's CPU path (the full master weight drawn from the CPU generator, then split by TP),
   which makes the init independent of the TP size; asking for host initialisation on an
   accelerator gives exactly the CPU backend's weights, then moved. While a chunk is built off
   the host, the device is torch's default device, so the modules megatron-core does not place
   itself (conv, class token, position embedding, layer scales, norms, projector) are created
   there directly; `place_module` then moves anything still elsewhere.
 - `to_device`: a batch (nested dicts, lists, tuples, dataclasses such as PackedSeqParams) moved
   non-blocking; tensors already there are returned as they are, so the CPU path is unchanged.
 - `collective_dtype`: the dtype a reduction of statistics uses. float64 where the collective
   library reduces it (gloo, nccl); HCCL's all-reduce has no float64 on Atlas training / A2 / A3
   (CANN's HcclAllReduce data types), so there float32.
 - `pin_memory_helps`: whether the data loader should pin its batches (page-locked host memory
   makes the non-blocking copy truly asynchronous). Pinning is worth it only when the host
   tensors are the ones copied; a batch re-cut on the host first (context parallelism) is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch

# Device types whose host->device copies run asynchronously from page-locked memory.
_PINNABLE = ("cuda", "npu")
# Collective libraries without a float64 all-reduce.
_NO_FLOAT64 = ("hccl",)


def device(backend: Optional[str] = None) -> torch.device:
    """This process's device, as the active platform says. `backend` (a --backend value) first
    activates that platform without megatron's patches: a process that only runs transformers
    (verify's reference, the demo's evaluation) follows the same choice as its spawned ranks."""
    from megatron_vita import platform

    plat = platform.current() if backend is None else platform.activate(backend, patch_megatron=False)
    return plat.device()


def host_initialization(requested: Optional[bool] = None, target: Optional[torch.device] = None) -> bool:
    """megatron's `use_cpu_initialization`: `requested` if given (Megatron-LM's flag), else True
    exactly when the target device is the host (see the module docstring for why)."""
    if requested is not None:
        return bool(requested)
    return (target or device()).type == "cpu"


@contextlib.contextmanager
def building(target: torch.device, host_init: bool) -> Iterator[None]:
    """Construct modules on `target` (torch's default device inside), or on the host when
    `host_init` (then `place_module` moves them). A no-op on the host."""
    if host_init or target.type == "cpu":
        yield
        return
    with torch.device(target):
        yield


def place_module(module: torch.nn.Module, target: torch.device) -> torch.nn.Module:
    """Move every parameter and buffer of `module` to `target` (in place; nothing already there is copied)."""
    if any(t.device != target for t in _tensors_of(module)):
        module.to(target)
    return module


def _tensors_of(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def collective_dtype(wanted: torch.dtype = torch.float64) -> torch.dtype:
    """`wanted` unless it is float64 and the platform's collective library cannot reduce it."""
    from megatron_vita import platform

    if wanted == torch.float64 and platform.current().dist_backend in _NO_FLOAT64:
        return torch.float32
    return wanted


def pin_memory_helps(target: Optional[torch.device] = None) -> bool:
    """Whether batches bound for `target` should be pinned by the loader (accelerators only)."""
    return (target or device()).type in _PINNABLE


def to_device(obj: Any, target: Optional[torch.device] = None, non_blocking: bool = True) -> Any:
    """`obj` with every tensor moved to `target` (default: this process's device).

    Walks dicts, lists, tuples (named ones too) and dataclass instances; anything else (ints,
    strings, None, sample ids) is returned unchanged. Containers are rebuilt, tensors already on
    `target` are reused, so on the host this returns the same tensors."""
    target = target or device()
    return _move(obj, target, non_blocking)


def _move(obj: Any, target: torch.device, non_blocking: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == target else obj.to(target, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return type(obj)((k, _move(v, target, non_blocking)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_move(v, target, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, target, non_blocking) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _move(getattr(obj, f.name), target, non_blocking)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def tensors_off(obj: Any, target: torch.device, where: str = "") -> list:
    """Paths of the tensors in `obj` (a module, or a nested batch as `to_device` walks it) that
    are not on `target`: empty when everything is placed. Tests and sanity checks use it."""
    if isinstance(obj, torch.nn.Module):
        named = list(obj.named_parameters()) + list(obj.named_buffers())
        return [f"{where}{name} on {t.device}" for name, t in named if t.device != target]
    if isinstance(obj, torch.Tensor):
        return [] if obj.device == target else [f"{where.rstrip('.') or 'tensor'} on {obj.device}"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in tensors_off(v, target, f"{where}{k}.")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in tensors_off(v, target, f"{where}{i}.")]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [p for f in dataclasses.fields(obj) for p in tensors_off(getattr(obj, f.name), target,
                                                                         f"{where}{f.name}.")]
    return []
