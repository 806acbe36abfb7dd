"""MindSpeed interop, with a STAND-IN `mindspeed` package written to tmp by the test (no real
MindSpeed runs here): its `mindspeed.megatron_adaptor` patches real megatron-core symbols through a
patch manager shaped like MindSpeed's (`mindspeed.patch_utils.MindSpeedPatchesManager.patches_info`,
keyed by dotted target) and records what it saw.

Checked: MindSpeed's adaptor goes first (nothing of ours is applied when it imports) and ours
after it; no symbol is patched twice: a feature whose symbols MindSpeed already patched is skipped
with a note (its kernel is already there), the other features apply; one of megatron-vita's own
megatron-core fixes on a MindSpeed-patched symbol fails in one line naming it; a MindSpeed built
for another megatron-core (its adaptor imports a megatron symbol this one lacks) fails in one line.
Each scenario runs in a fresh interpreter (patches are process-wide), the NPU features on the CPU
against the tests' torch_npu EMULATION (tests/emulation).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EMULATION = str(REPO / "tests" / "emulation")

PATCH_UTILS = '''
import importlib


class Patch:
    def __init__(self, orig_func_name, patch_func):
        self.orig_func_name, self.patch_func, self.wrappers, self.is_applied = orig_func_name, patch_func, [], False

    def apply_patch(self):
        parts = self.orig_func_name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            try:
                owner = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError:
                continue
        for name in parts[i:-1]:
            owner = getattr(owner, name)
        setattr(owner, parts[-1], self.patch_func)
        self.is_applied = True


class MindSpeedPatchesManager:
    patches_info = {}

    @staticmethod
    def register_patch(orig_func_name, new_func):
        MindSpeedPatchesManager.patches_info[orig_func_name] = Patch(orig_func_name, new_func)

    @staticmethod
    def apply_patches():
        for patch in MindSpeedPatchesManager.patches_info.values():
            patch.apply_patch()
'''

ADAPTOR = '''
import json
import os

import mindspeed_patches
from mindspeed.patch_utils import MindSpeedPatchesManager

# What was applied of megatron-vita's when MindSpeed's adaptor ran (must be nothing: it goes first).
OURS_BEFORE = [e.target for e in mindspeed_patches.REGISTRY.entries() if e.applied]
TARGETS = json.loads(os.environ["STANDIN_TARGETS"])


def _standin(target):
    def standin_kernel(*args, **kwargs):
        raise RuntimeError("stand-in MindSpeed kernel for " + target)
    standin_kernel.target = target
    return standin_kernel


for target in TARGETS:
    MindSpeedPatchesManager.register_patch(target, _standin(target))
MindSpeedPatchesManager.apply_patches()
'''

ADAPTOR_OTHER_CORE = '''
from megatron.core_r0_99.transformer.moe.fused_a2a import fused_dispatch  # a layout 0.12.1 does not have
'''

# Scenario 1: the whole start-up (platform.activate) with every NPU feature and the stand-in,
# which patches all symbols of one feature plus one megatron-core symbol nobody else touches.
SCENARIO_FEATURES = '''
import importlib, json, os, sys, warnings
import mindspeed_patches
from mindspeed_patches.features import FEATURES
from mindspeed_patches.registry import PatchRegistry


def targets(feature):
    probe = PatchRegistry()
    feature().register_patches(probe, None)
    return probe.registered()


def resolve(target):
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for name in parts[i:]:
        obj = getattr(obj, name)
    return obj


# Prefer a feature that patches megatron-core itself (what MindSpeed patches).
skipped = next((f for f in FEATURES if any(t.startswith("megatron.core") for t in targets(f))), FEATURES[0])
unrelated = "megatron.core.transformer.moe.moe_utils.permute"
standin = targets(skipped) + [unrelated]
os.environ["STANDIN_TARGETS"] = json.dumps(standin)
from megatron_vita import platform
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plat = platform.activate("cpu", features=[f.name for f in FEATURES], mindspeed=True)
adaptor = sys.modules["mindspeed.megatron_adaptor"]
ours = sorted({e.target for e in mindspeed_patches.REGISTRY.entries() if e.applied})
print(json.dumps({
    "skipped": skipped.name, "standin": standin, "ours_before": adaptor.OURS_BEFORE, "ours": ours,
    "enabled": mindspeed_patches.adaptor._ENABLED, "features": list(plat.features),
    "notes": mindspeed_patches.notes(),
    "warned": [str(w.message) for w in caught if w.category is mindspeed_patches.MindSpeedOverlapWarning],
    "standin_kept": [getattr(resolve(t), "target", None) == t for t in standin],
}))
'''

# Scenario 2: the stand-in patches a symbol one of megatron-vita's own fixes patches; the
# platform's start-up order (MindSpeed, then our fixes) must refuse it in one line.
SCENARIO_OWN_FIX = '''
import json, os
from megatron_vita.parallel.megatron_patches import PATCHES
fix = next(p for p in PATCHES if p.target.startswith("megatron.core.") and "cpu" in p.backends)
os.environ["STANDIN_TARGETS"] = json.dumps([fix.target])
from megatron_vita import platform
try:
    platform.activate("cpu", mindspeed=True)
    print(json.dumps({"target": fix.target, "error": None}))
except Exception as e:
    print(json.dumps({"target": fix.target, "error": str(e), "type": type(e).__name__}))
'''


def _standin(root: Path, adaptor: str) -> Path:
    pkg = root / "mindspeed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "patch_utils.py").write_text(textwrap.dedent(PATCH_UTILS))
    (pkg / "megatron_adaptor.py").write_text(textwrap.dedent(adaptor))
    return root


def _start(script: str, standin: Path, *argv: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_VITA_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(standin), EMULATION, str(REPO)])
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The scenarios, each in its own interpreter, started together (each imports megatron-core)."""
    root = tmp_path_factory.mktemp("standin")
    procs = {
        "features": _start(SCENARIO_FEATURES, _standin(root / "a", ADAPTOR)),
        "own_fix": _start(SCENARIO_OWN_FIX, _standin(root / "b", ADAPTOR)),
    }
    return {name: _finish(proc) for name, proc in procs.items()}


@pytest.mark.timeout(200)
def test_mindspeed_goes_first_and_no_symbol_is_patched_twice(runs):
    r = runs["features"]
    assert r["ours_before"] == []  # MindSpeed's adaptor ran before any patch of ours
    assert r["standin_kept"] == [True] * len(r["standin"])  # its patches are still in place
    assert not set(r["ours"]) & set(r["standin"]), r  # no symbol patched by both
    # The overlapping feature is skipped with a note naming it and the symbols; the others apply.
    assert r["skipped"] not in r["enabled"] and len(r["enabled"]) == len(r["features"]) - 1, r
    (note,) = r["notes"]
    assert note.startswith(f"mindspeed_patches: --{r['skipped']} skipped: MindSpeed already patched ")
    assert all(t in note for t in r["standin"][:-1]) and "\n" not in note
    assert r["warned"] == r["notes"]
    # Ours still applied after MindSpeed: megatron-vita's own fixes are in place.
    assert any(t.startswith("megatron.core.") for t in r["ours"]), r


@pytest.mark.timeout(200)
def test_own_fix_on_a_mindspeed_symbol_fails_in_one_line(runs):
    r = runs["own_fix"]
    assert r["type"] == "PatchConflictError", r
    assert r["error"].startswith(f"mindspeed_patches: {r['target']} is already patched by MindSpeed ("), r
    assert "would patch it a second time" in r["error"] and "\n" not in r["error"]


def test_mindspeed_for_another_megatron_core_fails_in_one_line(tmp_path, monkeypatch):
    """Its adaptor fails on a megatron symbol this megatron-core lacks: one line, before any patch."""
    import mindspeed_patches

    root = _standin(tmp_path, ADAPTOR_OTHER_CORE)
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "mindspeed" or m.startswith("mindspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(mindspeed_patches.PatchError) as e:
        mindspeed_patches.load_mindspeed(required=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("mindspeed_patches: importing mindspeed.megatron_adaptor failed "
                                              "(ModuleNotFoundError: No module named 'megatron.core_r0_99')")
    assert "megatron-core 0.12.1" in msg
    assert mindspeed_patches.REGISTRY.foreign() == {}
    for name in [m for m in sys.modules if m == "mindspeed" or m.startswith("mindspeed.")]:
        del sys.modules[name]
