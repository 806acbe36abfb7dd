"""The backend switch: choose cpu | cuda | npu once per process and own everything that differs.

Selection order: an explicit request (`--backend`), then `MEGATRON_VITA_BACKEND`, then auto
(npu if torch_npu imports, else cuda if available, else cpu). NPU is probed first because
`transfer_to_npu` makes `torch.cuda.is_available()` report the NPU.

A `Platform` owns: the device, the torch.distributed backend (gloo / nccl / hccl), the
accelerator module (torch.cuda / torch.npu / a CPU stand-in), RNG state (the CPU generator, the
accelerator's and megatron's tracker: seeding, checkpoints and resume go through it), memory
statistics and synchronize. Model code asks it nothing: only this package, spec leaves and
mindspeed_patches know which backend runs. `activate` also applies, once per process, every
megatron-core patch of the backend (`megatron_vita.parallel.megatron_patches`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

BACKENDS = ("cpu", "cuda", "npu")
ENV_VAR = "MEGATRON_VITA_BACKEND"

_ACTIVE: Optional["Platform"] = None


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


class _CpuAccelerator:
    """What megatron-vita needs from `torch.cuda`, answered for the CPU."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state() -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def memory_allocated() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def max_memory_allocated() -> int:
        # ru_maxrss is KiB on Linux.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Platform:
    name: str  # cpu | cuda | npu
    dist_backend: str  # gloo | nccl | hccl
    accelerator: Any  # torch.cuda, torch.npu or _CpuAccelerator

    @property
    def device_type(self) -> str:
        return self.name

    def device(self, local_rank: Optional[int] = None) -> torch.device:
        if self.name == "cpu":
            return torch.device("cpu")
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(self.name, local_rank)

    def set_device(self, local_rank: int) -> None:
        if self.name != "cpu":
            self.accelerator.set_device(local_rank)

    def synchronize(self) -> None:
        self.accelerator.synchronize()

    def empty_cache(self) -> None:
        self.accelerator.empty_cache()

    def manual_seed(self, seed: int) -> None:
        """Seed the CPU generator, the accelerator's and, once megatron's model-parallel groups
        exist, megatron's RNG tracker (its tensor-parallel streams), as Megatron-LM seeds."""
        torch.manual_seed(seed)
        if self.name != "cpu":
            self.accelerator.manual_seed(seed)
        # Groups cannot exist unless megatron's parallel_state was imported; HF-only processes never import it.
        ps = sys.modules.get("megatron.core.parallel_state")
        if ps is not None and ps.model_parallel_is_initialized():
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def get_rng_state(self) -> Dict[str, Any]:
        """Every random stream of this process: the CPU generator ("cpu"), the accelerator's
        (under the backend's name) and megatron's RNG tracker states ("tracker") once megatron's
        tensor-parallel RNG is loaded. Checkpoints save it per (PP, TP) rank."""
        state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.name != "cpu":
            state[self.name] = self.accelerator.get_rng_state()
        if "megatron.core.tensor_parallel.random" in sys.modules:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            state["tracker"] = get_cuda_rng_tracker().get_states()
        return state

    def set_rng_state(self, state: Dict[str, Any]) -> None:
        """Restore what `get_rng_state` returned: later draws repeat bit for bit."""
        torch.set_rng_state(state["cpu"])
        if self.name != "cpu" and self.name in state:
            self.accelerator.set_rng_state(state[self.name])
        if "tracker" in state:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            get_cuda_rng_tracker().set_states(state["tracker"])

    def memory_stats(self) -> Dict[str, int]:
        """Bytes in use now and at peak: device memory on cuda/npu, process RSS on cpu."""
        allocated = int(self.accelerator.memory_allocated())
        # On cpu the two come from different kernel counters (/proc RSS vs getrusage peak),
        # and the peak can read a few pages below the current RSS: a peak is never below now.
        return {"allocated": allocated, "max_allocated": max(allocated, int(self.accelerator.max_memory_allocated()))}

    def reset_peak_memory(self) -> None:
        if self.name != "cpu":
            self.accelerator.reset_peak_memory_stats()


def _probe_npu() -> Optional[str]:
    """None when an NPU is usable, else what is missing."""
    if importlib.util.find_spec("torch_npu") is None:
        return ("torch_npu is not installed. Install the torch_npu build that matches your torch and "
                "CANN (`pip install megatron-vita[npu]`), then `source <CANN>/set_env.sh`.")
    try:
        import torch_npu  # noqa: F401
    except Exception as e:  # torch_npu raises many kinds of errors when CANN is missing
        return (f"torch_npu is installed but does not import ({type(e).__name__}: {e}). "
                "Is the CANN toolkit environment loaded (`source <CANN>/set_env.sh`)?")
    if not torch.npu.is_available() or torch.npu.device_count() == 0:
        return "torch_npu imports but sees no NPU device (check ASCEND_RT_VISIBLE_DEVICES and npu-smi)."
    return None


def _probe_cuda() -> Optional[str]:
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch "
                "to use --backend cuda.")
    if not torch.cuda.is_available():
        return "torch has CUDA support but no GPU is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)."
    return None


def resolve_backend(requested: Optional[str] = None) -> str:
    """The backend name to use: explicit request > $MEGATRON_VITA_BACKEND > auto."""
    source = "--backend"
    if not requested:
        requested, source = os.environ.get(ENV_VAR), ENV_VAR
    requested = (requested or "auto").lower()
    if requested == "auto":
        # torch_npu is only probed when installed: a missing package is not an error under auto.
        if importlib.util.find_spec("torch_npu") is not None and _probe_npu() is None:
            return "npu"
        if torch.cuda.is_available() and torch.version.cuda is not None:
            return "cuda"
        return "cpu"
    if requested not in BACKENDS:
        raise BackendUnavailableError(f"{source}={requested!r} is not a backend; choose auto, cpu, cuda or npu")
    problem = {"npu": _probe_npu, "cuda": _probe_cuda}.get(requested, lambda: None)()
    if problem:
        raise BackendUnavailableError(f"backend '{requested}' (from {source}) is unavailable: {problem}")
    return requested


def activate(requested: Optional[str] = None, *, patch_megatron: bool = True) -> Platform:
    """Select the backend and prepare torch/megatron for it. Idempotent within a process.

    `patch_megatron=False` skips the megatron-side work (megatron_patches, the CPU shim,
    mindspeed_patches) for processes that only run the Hugging Face model.
    """
    global _ACTIVE
    name = resolve_backend(requested)
    if _ACTIVE is not None:
        if _ACTIVE.name != name:
            raise BackendUnavailableError(f"backend already active as '{_ACTIVE.name}'; cannot switch to '{name}'")
        if patch_megatron:
            _patch_megatron(name)
        return _ACTIVE
    if name == "npu":
        # Import order matters: torch_npu, then transfer_to_npu (rewrites torch.cuda -> torch.npu).
        importlib.import_module("torch_npu")
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
        plat = Platform("npu", "hccl", torch.npu)
    elif name == "cuda":
        plat = Platform("cuda", "nccl", torch.cuda)
    else:
        plat = Platform("cpu", "gloo", _CpuAccelerator())
    _ACTIVE = plat
    # megatron's tensor-parallel layers overlap grad all-reduce with compute only when the
    # device runs one kernel queue; it checks this variable (MindSpeed sets it too).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if patch_megatron:
        _patch_megatron(name)
    return plat


_PATCHED = set()


def _quiet_known_warnings() -> None:
    """Silence warnings megatron-core 0.12.1 prints on every rank that say nothing actionable."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor` is deprecated.*")
    # torch.distributed.checkpoint deprecations hit by megatron's dist-checkpoint loader.
    warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Please use DTensor instead and we are deprecating ShardedTensor.*")


def _patch_megatron(name: str) -> None:
    if name in _PATCHED:
        return
    _quiet_known_warnings()
    from megatron_vita.parallel import megatron_patches

    megatron_patches.apply(name)
    if name == "cpu":
        from megatron_vita.platform import cpu_shim

        cpu_shim.install()
    elif name == "npu":
        import mindspeed_patches

        mindspeed_patches.apply_for_npu()
    _PATCHED.add(name)


def current() -> Platform:
    """The active platform; activates auto-selection (without megatron patches) if none is."""
    return _ACTIVE if _ACTIVE is not None else activate(patch_megatron=False)
