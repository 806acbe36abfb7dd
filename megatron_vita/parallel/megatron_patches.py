"""Everything megatron-vita changes in megatron-core, in one list, applied through the patch registry.

megatron-core 0.12.1 assumes CUDA, TransformerEngine and Megatron-LM's trainer around it. Each
entry of `PATCHES` names the megatron-core symbol it changes, the function that changes it (a
`*_wrapper` receives megatron's function; anything else replaces it), the backends it applies on
and, in one line, why. Nothing else in megatron-vita assigns to megatron-core.

`megatron_vita.platform.activate` calls `apply(backend)` once per process, on every backend,
before models are built: it checks the installed megatron-core against
`mindspeed_patches.registry.EXPECTED_MEGATRON_CORE` (a warning on a mismatch, an error with
MINDSPEED_PATCHES_STRICT_VERSION=1), then applies the entries through the process-wide registry,
the one the NPU features (`mindspeed_patches`, npu only) register on as well, so that patches of
the same target stack and `remove()` restores every original, stale `from x import f` copies
included. `listing()` says what is changed and why; the CPU backend's torch-level changes
(torch.cuda answered on the CPU) are not megatron-core patches and are listed by
`megatron_vita.platform.cpu_shim.changes()`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from mindspeed_patches.registry import REGISTRY, PatchRegistry, check_megatron_core_version

ALL_BACKENDS = ("cpu", "cuda", "npu")
_DIST_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"


@dataclass(frozen=True)
class MegatronPatch:
    name: str
    target: str  # dotted path of the megatron-core symbol
    function: str  # "module:attribute" of the replacement or wrapper, imported when applied
    backends: Tuple[str, ...]
    reason: str  # one line

    def load(self) -> Callable:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


PATCHES: Tuple[MegatronPatch, ...] = (
    MegatronPatch(
        "fp8-quantize-without-te", "megatron.core.fp8_utils.quantize_param_shard",
        f"{__name__}:quantize_param_shard_wrapper", ALL_BACKENDS,
        "the distributed optimizer calls it every step even with no FP8 parameter, and without "
        "TransformerEngine it raises 'Invalid Transformer Engine version'"),
    MegatronPatch(
        "destroy-embedding-ranks", "megatron.core.parallel_state.destroy_model_parallel",
        f"{__name__}:destroy_model_parallel_wrapper", ALL_BACKENDS,
        "it leaves the embedding groups' global rank lists behind, so a rank outside the next "
        "layout's embedding groups believes it is still a member"),
    MegatronPatch(
        "per-parameter-lr-mult", "megatron.core.optimizer._get_param_groups",
        "megatron_vita.training.optimizer:param_groups_by_lr_mult_wrapper", ALL_BACKENDS,
        "it groups parameters by one optional LR multiplier; stage 2's layer-wise ViT LR needs "
        "each parameter's own lr_mult"),
    MegatronPatch(
        "dist-save-in-process", f"{_DIST_ASYNC}.FileSystemWriterAsync.write_preloaded_data_multiproc",
        "megatron_vita.checkpoint.dist_writer:write_buckets_in_process", ALL_BACKENDS,
        "it forks a process per file bucket (a child hangs on locks the data pipeline's threads "
        "hold) and omits the serialization_format torch >= 2.8 requires"),
    MegatronPatch(
        "dist-save-plain-queue", f"{_DIST_ASYNC}._get_write_results_queue",
        "megatron_vita.checkpoint.dist_writer:plain_results_queue", ALL_BACKENDS,
        "it starts a multiprocessing Manager server (outliving a rank that exits early) for "
        "results that the in-process writer hands over in the same process"),
    MegatronPatch(
        "cpu-rng-get", "megatron.core.tensor_parallel.random._get_cuda_rng_state",
        "megatron_vita.platform.cpu_shim:get_cpu_rng_state", ("cpu",),
        "it reads torch.cuda.default_generators; on the CPU the tensor-parallel RNG states are "
        "the CPU generator's"),
    MegatronPatch(
        "cpu-rng-set", "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        "megatron_vita.platform.cpu_shim:set_cpu_rng_state", ("cpu",),
        "it writes torch.cuda.default_generators; on the CPU the tensor-parallel RNG states are "
        "the CPU generator's"),
)


def patches(backend: Optional[str] = None) -> List[MegatronPatch]:
    """The entries that apply on `backend` (every entry when None)."""
    return [p for p in PATCHES if backend is None or backend in p.backends]


def listing(backend: Optional[str] = None) -> List[Tuple[str, str, str]]:
    """(name, target, reason) of every patch that applies on `backend` (all when None)."""
    return [(p.name, p.target, p.reason) for p in patches(backend)]


def describe(backend: Optional[str] = None) -> str:
    """The listing as text, one patch per line."""
    return "\n".join(f"{name}: {target}: {reason}" for name, target, reason in listing(backend))


def register(backend: str, registry: PatchRegistry = REGISTRY) -> None:
    """Register `backend`'s entries on `registry` (idempotent); nothing changes until applied."""
    if backend not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(ALL_BACKENDS)}")
    for patch in patches(backend):
        registry.register_patch(patch.target, patch.load(), reason=f"{patch.name}: {patch.reason}")


def apply(backend: str, registry: PatchRegistry = REGISTRY, strict_version: Optional[bool] = None) -> None:
    """Check megatron-core's version, then register and apply `backend`'s entries (idempotent)."""
    check_megatron_core_version(strict_version)
    register(backend, registry)
    registry.apply_patches()


def remove(registry: PatchRegistry = REGISTRY) -> None:
    """Restore every original on `registry` (the NPU features' too); a later `apply` re-applies."""
    registry.remove_patches()


def require(*names: str, registry: PatchRegistry = REGISTRY) -> None:
    """Raise RuntimeError unless the named patches are applied (for code that depends on them)."""
    by_name = {p.name: p for p in PATCHES}
    missing = [f"{name}: {by_name[name].target}" for name in names
               if not registry.is_applied(by_name[name].target)]
    if missing:
        raise RuntimeError(f"megatron-core is not patched ({'; '.join(missing)}): call "
                           "megatron_vita.platform.activate() in this process first")


# -- the fixes defined here (the others live with the code that needs them) -----------------


def quantize_param_shard_wrapper(quantize_param_shard: Callable) -> Callable:
    """With no FP8 parameters there is nothing to quantize: skip the call."""

    def quantize_param_shard_unless_empty(model_params, *args, **kwargs):
        if len(model_params) == 0:
            return None
        return quantize_param_shard(model_params, *args, **kwargs)

    return quantize_param_shard_unless_empty


def destroy_model_parallel_wrapper(destroy_model_parallel: Callable) -> Callable:
    """Also forget the embedding groups' global rank lists."""

    def destroy_model_parallel_and_embedding_ranks():
        from megatron.core import parallel_state as ps

        destroy_model_parallel()
        ps._EMBEDDING_GLOBAL_RANKS = None
        ps._POSITION_EMBEDDING_GLOBAL_RANKS = None

    return destroy_model_parallel_and_embedding_ranks
