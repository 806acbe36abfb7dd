"""The backend switch: choose cpu | cuda | npu once per process and own everything that differs.

Selection order: an explicit request (`--backend`), then `MEGATRON_VITA_BACKEND`, then auto
(npu if torch_npu imports, else cuda if available, else cpu). NPU is probed first because
`transfer_to_npu` makes `torch.cuda.is_available()` report the NPU.

A `Platform` owns: the device, the torch.distributed backend (gloo / nccl / hccl), the
accelerator module (torch.cuda / torch.npu / a CPU stand-in), RNG state (the CPU generator, the
accelerator's and megatron's tracker: seeding, checkpoints and resume go through it), memory
statistics and synchronize. Model code asks it nothing: only this package, spec leaves and
mindspeed_patches know which backend runs. `activate` also applies, once per process, every
megatron-core patch of the backend (`megatron_vita.parallel.megatron_patches`), and the kernel
features asked for (`features=`, MindSpeed's flag names; which backend allows which is
`megatron_vita.platform.features`): on npu, MindSpeed's own adaptor first when it is installed, then ours.
A torch_npu that declares `IS_EMULATION = True` (the tests' emulation) is never an NPU: auto
never selects it and `--backend npu` refuses it; it only lets the features run on the CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

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
    features: Tuple[str, ...] = ()  # kernel flags applied in this process ('use-flash-attn', ...)

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
        import torch_npu
    except Exception as e:  # torch_npu raises many kinds of errors when CANN is missing
        return (f"torch_npu is installed but does not import ({type(e).__name__}: {e}). "
                "Is the CANN toolkit environment loaded (`source <CANN>/set_env.sh`)?")
    if getattr(torch_npu, "IS_EMULATION", False) is True:
        return (f"the torch_npu that imports ({getattr(torch_npu, '__file__', '?')}) is the tests' emulation "
                "of the torch_npu op contracts (IS_EMULATION = True), not an NPU runtime; with it the NPU "
                "features run on --backend cpu")
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available() or npu.device_count() == 0:
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


def activate(requested: Optional[str] = None, *, patch_megatron: bool = True, features: Sequence[str] = (),
             mindspeed: Optional[bool] = None) -> Platform:
    """Select the backend and prepare torch/megatron for it. Idempotent within a process.

    `patch_megatron=False` skips the megatron-side work (megatron_patches, the CPU shim,
    mindspeed_patches) for processes that only run the Hugging Face model.
    `features`: kernel flag names ('use-fused-rmsnorm', ...) to apply; refused with one line per
    flag when the backend cannot run them (`platform.features.feature_problems`). Once applied,
    a process keeps them: a later call asking for other features fails.
    `mindspeed`: import MindSpeed's adaptor before ours; None = on npu when it is installed,
    True = require it (also on cpu: the interop tests use a stand-in), False = never.
    """
    global _ACTIVE
    from megatron_vita.config.features import normalize
    from megatron_vita.platform.features import feature_problems

    name = resolve_backend(requested)
    wanted = tuple(dict.fromkeys(normalize(f) for f in features))
    problems = feature_problems(name, wanted)
    if problems:
        raise BackendUnavailableError("\n".join(problems))
    if _ACTIVE is not None:
        if _ACTIVE.name != name:
            raise BackendUnavailableError(f"backend already active as '{_ACTIVE.name}'; cannot switch to '{name}'")
    elif name == "npu":
        # Import order matters: torch_npu, then transfer_to_npu (rewrites torch.cuda -> torch.npu).
        importlib.import_module("torch_npu")
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
        _ACTIVE = Platform("npu", "hccl", torch.npu)
    elif name == "cuda":
        _ACTIVE = Platform("cuda", "nccl", torch.cuda)
    else:
        _ACTIVE = Platform("cpu", "gloo", _CpuAccelerator())
    # megatron's tensor-parallel layers overlap grad all-reduce with compute only when the
    # device runs one kernel queue; it checks this variable (MindSpeed sets it too).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if patch_megatron:
        _patch_megatron(name, mindspeed)
        _ACTIVE = _apply_features(_ACTIVE, wanted)
    elif wanted:
        raise BackendUnavailableError("kernel features need patch_megatron=True (they patch the megatron model)")
    return _ACTIVE


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


def _patch_megatron(name: str, mindspeed: Optional[bool]) -> None:
    """Once per process: MindSpeed's adaptor (when used), megatron-vita's megatron-core fixes, the
    CPU shim on cpu. MindSpeed goes first because it must patch megatron before anything imports
    from it; ours come after and never patch a symbol it patched (mindspeed_patches.adaptor says
    what happens on an overlap)."""
    if name in _PATCHED:
        return
    _quiet_known_warnings()
    import mindspeed_patches
    from megatron_vita.parallel import megatron_patches

    if mindspeed or (mindspeed is None and name == "npu"):
        mindspeed_patches.load_mindspeed(required=bool(mindspeed))
    megatron_patches.apply(name)
    if name == "cpu":
        from megatron_vita.platform import cpu_shim

        cpu_shim.install()
    _PATCHED.add(name)


def _apply_features(plat: Platform, wanted: Tuple[str, ...]) -> Platform:
    """Apply the kernel features once per process; the platform records them.

    The NPU features go through mindspeed_patches (on cpu only against the emulation, which
    activate checked); the CUDA ones are leaf choices that models.common.leaves reads from
    `Platform.features`. Features cannot change once a process applied some (or, on npu, none:
    the NPU adapter runs at the first activate, features or not)."""
    import mindspeed_patches

    adapter_due = plat.name == "npu" and not mindspeed_patches.is_applied()
    if not adapter_due and (not wanted or set(wanted) == set(plat.features)):
        return plat
    if plat.features or (plat.name != "cuda" and mindspeed_patches.is_applied()):
        applied = ", ".join(plat.features) or "none"
        raise BackendUnavailableError(
            f"kernel features are applied once per process (applied: {applied}); cannot apply "
            f"{', '.join(wanted)} now: pass them to the first platform.activate of the process")
    if plat.name != "cuda":
        mindspeed_patches.apply_for_npu(argparse.Namespace(**{f.replace("-", "_"): True for f in wanted}),
                                        use_mindspeed=False)
    return dataclasses.replace(plat, features=wanted)


def current() -> Platform:
    """The active platform; activates auto-selection (without megatron patches) if none is."""
    return _ACTIVE if _ACTIVE is not None else activate(patch_megatron=False)
