"""`transfer_to_cpu`: run megatron-core's hard-coded CUDA calls on a CPU-only torch.

torch_npu ships `transfer_to_npu`, which rewrites `torch.cuda` / `'cuda'` to the NPU so that
unmodified Megatron runs on Ascend. This module does the same for CPU, so that the CPU backend
runs the very megatron-core code paths (TP/PP/SP/dist-opt/checkpointing) that run on a cluster.
Call sites it covers (megatron-core 0.12.1): RNG tracker (tensor_parallel/random.py), RoPE
inv_freq on `torch.cuda.current_device()`, `device='cuda'` tensors in the optimizers, the
`grad.type() == 'torch.cuda.FloatTensor'` asserts in clip_grads, `pin_memory=True` in
rope_utils, and current_device()/streams/events in DDP buffers, schedules and p2p.

Installed once per process by `megatron_vita.platform.activate("cpu")`; `installed_sites()`
lists which call sites were redirected (useful when a megatron upgrade adds new ones).
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


def _cpu_rng_get(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_rng_set(state, *args, **kwargs):
    torch.set_rng_state(state)


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

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    # RNG: megatron forks "CUDA" RNG states for tensor-parallel dropout; on CPU they live in
    # the CPU generator. manual_seed_all is left alone: torch.manual_seed calls it.
    cuda.get_rng_state = _cpu_rng_get
    cuda.set_rng_state = _cpu_rng_set
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.stream = lambda *a, **k: _NullContext()
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_get
    mrandom._set_cuda_rng_state = _cpu_rng_set


def is_installed() -> bool:
    return _MODE is not None


def installed_sites() -> str:
    """Call sites redirected so far (only counted when installed with record_sites=True)."""
    return "\n".join(f"{n:6d}x {site}" for site, n in sorted(_SITES.items()))
