"""`transfer_to_cpu`: run megatron-core's hard-coded CUDA calls on a CPU-only torch.

torch_npu ships `transfer_to_npu`, which rewrites `torch.cuda` / `'cuda'` to the NPU so that
unmodified Megatron runs on Ascend. This module does the same for CPU, so that the CPU backend
runs the very megatron-core code paths (TP/PP/SP/dist-opt/checkpointing) that run on a cluster.
Call sites it covers (megatron-core 0.12.1): RNG tracker (tensor_parallel/random.py), RoPE
inv_freq on `torch.cuda.current_device()`, `device='cuda'` tensors in the optimizers, the
`grad.type() == 'torch.cuda.FloatTensor'` asserts in clip_grads, `pin_memory=True` in
rope_utils, and current_device()/streams/events in DDP buffers, schedules and p2p.

Installed once per process by `megatron_vita.platform.activate("cpu")`; `changes()` lists what
it changes in torch and why, `installed_sites()` which call sites were redirected (useful when a
megatron upgrade adds new ones). It changes nothing in megatron-core: megatron's own CUDA RNG
hooks are answered by `get_cpu_rng_state` / `set_cpu_rng_state`, registered with every other
megatron-core patch in `megatron_vita.parallel.megatron_patches`.
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_SITES: Counter = Counter()
_MODE = None
_RECORD = False


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's factory functions.
    return isinstance(dev, int) and not isinstance(dev, bool)


def _caller_module(depth: int = 3) -> str:
    try:
        return sys._getframe(depth).f_globals.get("__name__", "")
    except ValueError:
        return ""


def _record(what: str) -> None:
    if _RECORD:
        _SITES[f"{_caller_module(3)}: {what}"] += 1


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU for every torch call made in this process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            _record("Tensor.cuda()")
            return args[0]
        if func is torch.Tensor.pin_memory:
            _record("Tensor.pin_memory()")
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # Only megatron asserts on CUDA type names; everyone else sees the truth.
            if _caller_module(2).startswith("megatron.") and name.startswith("torch.") and ".cuda." not in name:
                _record("Tensor.type()")
                return "torch.cuda." + name[len("torch."):]
            return name
        if kwargs.get("pin_memory"):
            _record("pin_memory=True")
            kwargs = dict(kwargs, pin_memory=False)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            _record(f"{getattr(func, '__name__', func)}(device=cuda)")
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            _record("Tensor.to(cuda)")
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NullContext:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event(_NullContext):
    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream(_NullContext):
    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _Event()

    def synchronize(self):
        pass


def get_cpu_rng_state(*args, **kwargs):
    """megatron's `_get_cuda_rng_state` on the CPU (registered in parallel/megatron_patches.py)."""
    return torch.get_rng_state()


def set_cpu_rng_state(state, *args, **kwargs):
    """megatron's `_set_cuda_rng_state` on the CPU (registered in parallel/megatron_patches.py)."""
    torch.set_rng_state(state)


def _returns(value):
    """A new function answering `value`. One per attribute: torch._dynamo keeps one rule per
    function object and refuses an object that stands for two torch.cuda functions."""

    def answer(*args, **kwargs):
        return value

    return answer


# (attribute of torch.cuda, its CPU answer, who calls it). Not megatron-core patches: these
# change torch, for every caller in the process, as transfer_to_npu does on Ascend.
_TORCH_CUDA = (
    ("current_device", lambda: "cpu", "megatron's DDP buffers, RoPE, optimizers and p2p place tensors there"),
    ("device_count", lambda: 1, "megatron's local-rank arithmetic"),
    ("set_device", _returns(None), "rank start-up"),
    # megatron forks "CUDA" RNG states for tensor-parallel dropout; on CPU they live in the CPU
    # generator. manual_seed_all is left alone: torch.manual_seed calls it.
    ("get_rng_state", get_cpu_rng_state, "megatron's RNG tracker and checkpointing"),
    ("set_rng_state", set_cpu_rng_state, "megatron's RNG tracker and checkpointing"),
    ("manual_seed", lambda seed: torch.manual_seed(seed), "megatron's model_parallel_cuda_manual_seed"),
    ("synchronize", _returns(None), "megatron's timers and device-to-host copies"),
    ("empty_cache", _returns(None), "megatron's memory clean-ups"),
    ("current_stream", lambda *a, **k: _Stream(), "megatron's DDP overlap, schedules and p2p"),
    ("default_stream", lambda *a, **k: _Stream(), "megatron's DDP overlap, schedules and p2p"),
    ("Stream", _Stream, "megatron's DDP overlap, schedules and p2p"),
    ("Event", _Event, "megatron's DDP overlap, schedules and p2p"),
    ("stream", lambda *a, **k: _NullContext(), "megatron's DDP overlap, schedules and p2p"),
    ("nvtx.range_push", _returns(None), "megatron's profiling ranges"),
    ("nvtx.range_pop", _returns(None), "megatron's profiling ranges"),
    ("memory_allocated", _returns(0), "megatron's memory reports"),
    ("max_memory_allocated", _returns(0), "megatron's memory reports"),
    ("memory_reserved", _returns(0), "megatron's memory reports"),
    ("max_memory_reserved", _returns(0), "megatron's memory reports"),
    ("reset_peak_memory_stats", _returns(None), "megatron's memory reports"),
)
_MODE_REASON = ("'cuda' placements (device=, .cuda(), .to), pin_memory and megatron's "
                "'torch.cuda.*Tensor' type checks, for every torch call in the process")


def changes():
    """(target, reason) of every torch-level change the shim makes, the function mode first."""
    return ([("torch function mode (transfer_to_cpu)", _MODE_REASON)]
            + [(f"torch.cuda.{attr}", reason) for attr, _, reason in _TORCH_CUDA])


def install(record_sites: bool = False) -> None:
    """Install the shim in this process (idempotent). Must run before megatron models are built."""
    global _MODE, _RECORD
    _RECORD = record_sites
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("transfer_to_cpu must not be installed where CUDA is available")
    _MODE = _CudaToCpu()
    # Entered for the life of the process, like transfer_to_npu's global patching.
    _MODE.__enter__()
    for attr, value, _ in _TORCH_CUDA:
        path, _, name = attr.rpartition(".")
        owner = torch.cuda.nvtx if path == "nvtx" else torch.cuda
        setattr(owner, name, value)


def is_installed() -> bool:
    return _MODE is not None


def installed_sites() -> str:
    """Call sites redirected so far (only counted when installed with record_sites=True)."""
    return "\n".join(f"{n:6d}x {site}" for site, n in sorted(_SITES.items()))
