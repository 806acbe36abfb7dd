"""megatron_patches: the one list of megatron-vita's changes to megatron-core, and that it is complete.

- the list: one entry per target, each with a one-line reason; the CPU RNG hooks only on cpu;
- applied on a private registry every target is changed (megatron's own `from x import f`
  copies follow) and does what its reason says; removed, every target and copy is the original
  object again; a megatron-core version mismatch in strict mode stops before anything changes;
- code that depends on a patch refuses to run without it;
- completeness: a fresh process snapshots megatron-core's functions and classes, activates the
  cpu backend and runs a tiny model through the stack (build, per-parameter LR groups,
  distributed optimizer, one training step, an in-process dist save, RNG state, teardown). Every
  function or class that then differs from the snapshot is a registered target or a copy of
  one, and after `remove()` none differs.
"""
import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vita.parallel import megatron_patches
from mindspeed_patches import registry as reg
from mindspeed_patches.registry import REGISTRY, MegatronVersionError, PatchRegistry

REPO = Path(__file__).resolve().parents[2]
ALL = ("cpu", "cuda", "npu")


def _owner(target):
    """(object holding the target, attribute name), importing the longest module prefix."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for part in parts[i:-1]:
        obj = getattr(obj, part)
    return obj, parts[-1]


_ABSENT = object()  # a target this version lacks (numpy 2's product), created by its patch


def _raw(target):
    owner, attr = _owner(target)
    return vars(owner).get(attr, _ABSENT)


def test_the_list_names_each_target_once_with_a_one_line_reason():
    names = [p.name for p in megatron_patches.PATCHES]
    targets = [p.target for p in megatron_patches.PATCHES]
    assert len(set(names)) == len(names) and len(set(targets)) == len(targets)
    for name, target, reason in megatron_patches.listing():
        # numpy.product: an alias numpy 2 removed, which megatron-core still calls
        assert target.startswith("megatron.core.") or target == "numpy.product", name
        assert reason and "\n" not in reason, name
    cpu_only = {n for n, _, _ in megatron_patches.listing("cpu")} - {n for n, _, _ in megatron_patches.listing("cuda")}
    assert cpu_only == {"cpu-rng-get", "cpu-rng-set"}
    assert megatron_patches.listing("npu") == megatron_patches.listing("cuda")
    assert len(megatron_patches.describe().splitlines()) == len(megatron_patches.PATCHES)


def test_apply_changes_every_target_and_remove_restores_the_original_objects():
    registry = PatchRegistry()
    for backend in ALL:
        megatron_patches.register(backend, registry)
    targets = [p.target for p in megatron_patches.PATCHES]
    assert registry.registered() == targets
    assert [e.reason.split(":")[0] for e in registry.entries()] == [p.name for p in megatron_patches.PATCHES]
    originals = {t: _raw(t) for t in targets}
    # Modules holding a target under its own name (`from x import f`) must follow it.
    copies = {t: [vars(m) for m in list(sys.modules.values()) if isinstance(m, type(sys))
                  and vars(m).get(t.rsplit(".", 1)[1]) is originals[t]] for t in targets}
    assert len(copies["megatron.core.fp8_utils.quantize_param_shard"]) >= 2  # fp8_utils, distrib_optimizer
    registry.apply_patches()
    try:
        for t in targets:
            assert _raw(t) is not originals[t], t
            assert all(ns[t.rsplit(".", 1)[1]] is _raw(t) for ns in copies[t]), t
        _check_the_patches_do_what_their_reasons_say()
    finally:
        registry.remove_patches()
    for t in targets:
        assert _raw(t) is originals[t], t
        assert all(ns[t.rsplit(".", 1)[1]] is originals[t] for ns in copies[t]), t


def _check_the_patches_do_what_their_reasons_say():
    import queue

    import torch
    from megatron.core import fp8_utils
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.tensor_parallel import random

    import numpy

    assert numpy.product is numpy.prod  # megatron's dist_checkpointing calls it
    assert fp8_utils.quantize_param_shard([], [], [], None) is None  # no TransformerEngine here
    assert distrib_optimizer.quantize_param_shard([], [], [], None) is None
    ps._EMBEDDING_GLOBAL_RANKS, ps._POSITION_EMBEDDING_GLOBAL_RANKS = [0], [0]
    ps.destroy_model_parallel()
    assert ps._EMBEDDING_GLOBAL_RANKS is None and ps._POSITION_EMBEDDING_GLOBAL_RANKS is None
    assert type(filesystem_async._get_write_results_queue()) is queue.Queue  # no Manager process
    state = random._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    random._set_cuda_rng_state(state)


def test_unpatched_megatron_core_raises_where_the_patches_are_missing():
    from megatron.core import fp8_utils

    with pytest.raises(RuntimeError, match="Transformer Engine"):
        fp8_utils.quantize_param_shard([], [], [], None)


def test_a_strict_version_mismatch_stops_before_anything_is_patched(monkeypatch):
    monkeypatch.setattr(reg, "EXPECTED_MEGATRON_CORE", "0.99.0")
    registry = PatchRegistry()
    with pytest.raises(MegatronVersionError, match="0.99.0"):
        megatron_patches.apply("cpu", registry, strict_version=True)
    assert registry.registered() == []
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        megatron_patches.register("tpu", registry)


def test_code_that_needs_a_patch_refuses_to_run_without_it(tmp_path):
    from megatron_vita.checkpoint.dist_writer import save_in_process
    from megatron_vita.training.optimizer import OptimConfig, build_optimizer

    assert not any(REGISTRY.is_applied(p.target) for p in megatron_patches.PATCHES)  # nothing activated here
    with pytest.raises(RuntimeError, match=r"per-parameter-lr-mult.*platform\.activate\(\)"):
        build_optimizer([], OptimConfig())
    with pytest.raises(RuntimeError, match=r"dist-save-in-process.*dist-save-plain-queue"):
        save_in_process({}, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _megatron_names(tree):
    """Names a module binds to megatron objects by import (`from megatron.core import x as y`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("megatron.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_no_module_assigns_to_megatron_core_outside_the_list():
    """Static complement of the runtime check below: it also sees temporary (scoped) patches."""
    offenders = []
    for path in sorted([*REPO.glob("megatron_vita/**/*.py"), *REPO.glob("mindspeed_patches/**/*.py")]):
        if path == REPO / "megatron_vita/parallel/megatron_patches.py":
            continue  # the list itself (its fixes reset megatron state they are about)
        tree = ast.parse(path.read_text(), str(path))
        names = _megatron_names(tree)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr"):
                targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
            for target in targets:
                if isinstance(target, (ast.Attribute, ast.Subscript)) and _root(target) in names:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(target)}")
    assert offenders == [], "megatron-core changed outside megatron_patches.PATCHES:\n" + "\n".join(offenders)


COMPLETENESS_SCRIPT = r'''
import json, os, sys, tempfile, types

import psutil
import torch

torch.set_num_threads(1)
# The stack's modules, imported before any backend is activated (nothing patched yet).
from megatron_vita import platform
from megatron_vita.checkpoint.dist_writer import save_in_process
from megatron_vita.config import ModelConfig, ParallelConfig
from megatron_vita.models.long_vita.builder import build_model_chunks
from megatron_vita.parallel import megatron_patches
from megatron_vita.parallel.state import parallel_layout
from megatron_vita.training import checkpointing  # noqa: F401
from megatron_vita.training.engine import train_step, wrap_ddp
from megatron_vita.training.optimizer import OptimConfig, assign_vision_lr_multipliers, build_optimizer
from mv_testlib import multimodal_batch

# Every megatron.core module that imports here (those needing TransformerEngine, mamba, TensorRT
# do not), so that modules megatron loads lazily during the run are compared too.
import importlib, pkgutil, warnings
import megatron.core
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for info in pkgutil.walk_packages(megatron.core.__path__, "megatron.core.", onerror=lambda name: None):
        try:
            importlib.import_module(info.name)
        except Exception:
            pass

MISSING = object()

def namespaces():
    """Every loaded megatron.core module and every class it defines, by dotted name."""
    for name, module in list(sys.modules.items()):
        if isinstance(module, types.ModuleType) and (name + ".").startswith("megatron.core."):
            yield name, vars(module)
            for attr, value in list(vars(module).items()):
                if isinstance(value, type) and value.__module__ == name:
                    yield f"{name}.{attr}", vars(value)

def is_code(value):
    return callable(value) or isinstance(value, (staticmethod, classmethod, property))

def changed_since(before):
    """Functions and classes that differ (process groups and other runtime state are not code)."""
    out = {}
    for name, ns in namespaces():
        if name not in before:  # imported later: nothing to compare with
            continue
        for attr in set(before[name]) | set(ns):
            old, new = before[name].get(attr, MISSING), ns.get(attr, MISSING)
            if old is not new and (is_code(old) or is_code(new)):
                out[f"{name}.{attr}"] = new
    return out

before = {name: dict(ns) for name, ns in namespaces()}
modules_before = set(sys.modules)
platform.init_distributed(platform.activate("cpu"))
cfg, par = ModelConfig.from_name("tiny"), ParallelConfig()
with parallel_layout(par):
    chunks = build_model_chunks(cfg, par)
    assign_vision_lr_multipliers(chunks, 0.1, 0.9)
    ddp = wrap_ddp(chunks, use_distributed_optimizer=True)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3), use_distributed_optimizer=True)
    step = train_step(ddp, optimizer, multimodal_batch(cfg, seq_len=32))
    with tempfile.TemporaryDirectory() as d:
        save_in_process({"model": chunks[0].sharded_state_dict()}, d)
        saved = sorted(os.listdir(d))
    children = len(psutil.Process().children(recursive=True))
    plat = platform.current()
    plat.set_rng_state(plat.get_rng_state())
targets = {p.target: p.target.rsplit(".", 1)[1] for p in megatron_patches.patches("cpu")
           if p.target.startswith("megatron.core.")}  # numpy.product: outside megatron.core, checked apart
import numpy
numpy_product = numpy.product is numpy.prod
changed = changed_since(before)
values = {t: changed.get(t) for t in targets}
copies = sorted(path for path, value in changed.items() if path not in targets
                and any(path.rsplit(".", 1)[1] == attr and value is values[t] for t, attr in targets.items()))
megatron_patches.remove()
print(json.dumps({
    "loss": step.loss, "saved": saved, "children": children, "numpy_product": numpy_product,
    "targets_changed": sorted(t for t in targets if t in changed),
    "unregistered": sorted(set(changed) - set(targets) - set(copies)),
    "copies": copies,
    "not_snapshotted": sorted(t for t in targets if t.rsplit(".", 1)[0] not in before),
    "late_modules": sorted(m for m in set(sys.modules) - modules_before if m.startswith("megatron.core.")),
    "after_remove": sorted(changed_since(before)),
}))
'''


@pytest.mark.timeout(400)
def test_every_change_to_megatron_core_on_a_training_path_is_a_registered_patch():
    proc = subprocess.run([sys.executable, "-c", COMPLETENESS_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=380, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loss"] > 0 and any(name.endswith(".distcp") for name in out["saved"])
    assert out["children"] == 0  # the dist save forked nothing, and no Manager server is left
    assert out["not_snapshotted"] == [] and out["late_modules"] == []  # every module used was compared
    assert out["unregistered"] == [], "megatron-core changed outside megatron_patches.PATCHES"
    assert out["targets_changed"] == sorted(p.target for p in megatron_patches.patches("cpu")
                                            if p.target.startswith("megatron.core."))
    assert out["numpy_product"]
    assert "megatron.core.optimizer.distrib_optimizer.quantize_param_shard" in out["copies"]
    assert out["after_remove"] == []
