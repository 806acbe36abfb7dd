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
    create_dummy: bool = False  # the target is absent from this version (an alias it lost)

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
        "numpy2-product", "numpy.product", "numpy:prod", ALL_BACKENDS,
        "megatron-core's dist_checkpointing calls np.product, which numpy 2 removed (np.prod): "
        "saving with the distributed optimizer (flattened shards) fails in its sharding check",
        create_dummy=True),
    MegatronPatch(
        "dist-optimizer-fresh-state", "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.state_dict",
        f"{__name__}:dist_optimizer_state_dict_wrapper", ALL_BACKENDS,
        "without apex/TransformerEngine it reads Adam's per-parameter 'step', which a fresh optimizer "
        "lacks, so loading a checkpoint (it calls state_dict() before reading one) asserts"),
    MegatronPatch(
        "dist-optimizer-load-step", "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
        "_set_main_param_and_optimizer_states", f"{__name__}:set_main_param_states_wrapper", ALL_BACKENDS,
        "it copies every key of torch Adam's state from the checkpoint, 'step' included, which the "
        "checkpoint does not hold per parameter (load_state_dict sets it, one tensor shared by every "
        "parameter, which Adam then increments once per parameter), so loading raises KeyError"),
    MegatronPatch(
        "dist-optimizer-save-no-step", "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
        "_get_main_param_and_optimizer_states", f"{__name__}:main_param_states_without_step_wrapper",
        ALL_BACKENDS,
        "with torch Adam (no apex/TransformerEngine) every parameter's state holds a 'step', which the "
        "sharded save skips as a tensor but leaves in the per-rank dicts: it lands in the common "
        "state (rank 0's only) and every save warns that the ranks' common states differ; the step "
        "is saved with the param groups"),
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
        registry.register_patch(patch.target, patch.load(), create_dummy=patch.create_dummy,
                                reason=f"{patch.name}: {patch.reason}")


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


def dist_optimizer_state_dict_wrapper(state_dict: Callable) -> Callable:
    """A fresh torch Adam has no state: give it megatron's zero state and step 0 first.

    Only on the path without apex/TE (which reads 'step' from every parameter's state); a
    checkpoint being loaded then overwrites all of it."""

    def state_dict_of_fresh_optimizer(self):
        from megatron.core.optimizer import distrib_optimizer

        inner = self.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        fresh = params and all(len(inner.state[p]) == 0 for p in params)
        if fresh and not distrib_optimizer.HAVE_APEX_OR_TE and self.init_state_fn is not None:
            import torch

            self.init_state_fn(inner, self.config)
            for p in params:
                inner.state[p].setdefault("step", torch.tensor(0.0))
        return state_dict(self)

    return state_dict_of_fresh_optimizer


def set_main_param_states_wrapper(set_states: Callable) -> Callable:
    """Leave Adam's 'step' out of the per-parameter copy (load_state_dict already set it), and
    give each parameter a step tensor of its own."""

    def set_main_param_and_optimizer_states_but_step(self, model_param, tensors):
        if "step" in tensors or self.ddp_config.use_custom_fsdp or self.config.use_precision_aware_optimizer:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return set_states(self, model_param, tensors)
        finally:
            if step is not None:
                # load_state_dict gave every parameter the SAME step tensor, which torch Adam
                # then increments in place once per parameter: each gets its own.
                state["step"] = step.clone()

    return set_main_param_and_optimizer_states_but_step


def main_param_states_without_step_wrapper(get_states: Callable) -> Callable:
    """The main parameter and Adam's moments of a parameter, without torch Adam's 'step'."""

    def main_param_and_optimizer_states_without_step(self, model_param):
        tensors = get_states(self, model_param)
        if not (self.ddp_config.use_custom_fsdp or self.config.use_precision_aware_optimizer):
            tensors.pop("step", None)
        return tensors

    return main_param_and_optimizer_states_without_step


def destroy_model_parallel_wrapper(destroy_model_parallel: Callable) -> Callable:
    """Also forget the embedding groups' global rank lists."""

    def destroy_model_parallel_and_embedding_ranks():
        from megatron.core import parallel_state as ps

        destroy_model_parallel()
        ps._EMBEDDING_GLOBAL_RANKS = None
        ps._POSITION_EMBEDDING_GLOBAL_RANKS = None

    return destroy_model_parallel_and_embedding_ranks
