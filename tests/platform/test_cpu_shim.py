"""transfer_to_cpu: megatron-core's hard-coded CUDA call sites run on a CPU-only torch.

The shim installs a process-wide TorchFunctionMode, so it is only ever activated in a spawned
rank (platform.spawn activates the cpu backend there), never in the pytest process. The rank
returns plain lists; the references are computed here with plain torch. A fresh process
without the shim is the negative control: the same megatron calls fail there.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vita.platform import spawn

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim refuses to install where CUDA works")

SEED = 123
ROPE_DIM, ROPE_LEN = 8, 6


def _attempt(out, name, fn):
    try:
        out[name] = fn()
    except Exception as e:  # reported to the parent, which shows it in the failed assertion
        out[name] = f"FAILED {type(e).__name__}: {e}"


def _as_caller(module_name, expr, **names):
    """Evaluate `expr` in code whose module is `module_name` (the shim looks at the caller's module)."""
    namespace = {"__name__": module_name, **names}
    exec(compile(f"result = {expr}", f"<{module_name}>", "exec"), namespace)
    return namespace["result"]


def _shim_rank(rank, world_size):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    from megatron_vita.platform import cpu_shim

    out = {"installed": cpu_shim.is_installed()}
    _attempt(out, "factories", lambda: [str(t.device) for t in (
        torch.empty(2, device="cuda"), torch.zeros(2, device=torch.device("cuda", 0)),
        torch.ones(2, device=0), torch.tensor([1.0], device="cuda:0"), torch.arange(3, device="cuda"),
        torch.full((2,), 1.0, device="cuda"))])

    def moves():
        t = torch.ones(3)
        same = [t.cuda() is t, t.cuda(0) is t, t.to("cuda") is t, t.to(device="cuda") is t,
                t.to(torch.device("cuda")) is t]
        converted = t.to("cuda", torch.float64)
        return same + [str(converted.device), str(converted.dtype)]
    _attempt(out, "moves", moves)

    def pinned():
        t = torch.ones(2)
        return [torch.empty(4, pin_memory=True).is_pinned(), str(torch.zeros(2, pin_memory=True).device),
                t.pin_memory() is t]
    _attempt(out, "pin_memory", pinned)

    def type_names():
        f32, bf16 = torch.ones(1), torch.ones(1, dtype=torch.bfloat16)
        return {
            "here": f32.type(),
            "megatron": _as_caller("megatron.core.optimizer.some_module", "t.type()", t=f32),
            "megatron_bf16": _as_caller("megatron.core.transformer.x", "t.type()", t=bf16),
            "megatron_vita": _as_caller("megatron_vita.models.x", "t.type()", t=f32),
            "megatron_cast": _as_caller("megatron.core.x", "str(t.type(torch.float64).dtype)", t=f32, torch=torch),
        }
    _attempt(out, "type_names", type_names)

    def rng():
        parallel_state.initialize_model_parallel(1, 1)
        tracker = tensor_parallel.get_cuda_rng_tracker
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
        outer = torch.get_rng_state()
        with tracker().fork():
            first = torch.rand(4).tolist()
        restored = torch.equal(torch.get_rng_state(), outer)
        with tracker().fork():
            second = torch.rand(4).tolist()
        outer_draw = torch.rand(4).tolist()
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
        with tracker().fork():
            repeat = torch.rand(4).tolist()
        tensor_parallel.model_parallel_cuda_manual_seed(SEED + 1)
        with tracker().fork():
            other_seed = torch.rand(4).tolist()
        return dict(first=first, restored=restored, second=second, outer_draw=outer_draw,
                    repeat=repeat, other_seed=other_seed)
    _attempt(out, "rng", rng)

    def clip():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 3
        before = [p.grad.flatten().tolist() for p in params]
        grads = [p.grad for p in params]
        l2 = get_grad_norm_fp32(grads)
        linf = get_grad_norm_fp32(grads, norm_type=math.inf)
        clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=l2)
        return dict(before=before, l2=float(l2), linf=float(linf),
                    after=[p.grad.flatten().tolist() for p in params])
    _attempt(out, "clip", clip)

    def rope():
        rotary = RotaryEmbedding(kv_channels=ROPE_DIM, rotary_percent=1.0)
        emb = rotary(ROPE_LEN)
        return dict(shape=list(emb.shape), device=str(emb.device), values=emb.flatten().tolist())
    _attempt(out, "rope", rope)

    def listed_changes():
        from megatron.core.tensor_parallel import random as megatron_random

        ours = {f"torch.cuda.{prefix}{n}": v for prefix, owner in (("", torch.cuda), ("nvtx.", torch.cuda.nvtx))
                for n, v in vars(owner).items() if getattr(v, "__module__", None) == cpu_shim.__name__}
        return dict(listed=[t for t, _ in cpu_shim.changes()], reasons=[bool(r) for _, r in cpu_shim.changes()],
                    found=list(ours), distinct=len({id(v) for v in ours.values()}) == len(ours),
                    megatron_rng_hooks=[megatron_random._get_cuda_rng_state is cpu_shim.get_cpu_rng_state,
                                                    megatron_random._set_cuda_rng_state is cpu_shim.set_cpu_rng_state])
    _attempt(out, "changes", listed_changes)
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def shim():
    (out,) = spawn(_shim_rank, 1, timeout=180)
    return out


def _ok(value):
    assert not (isinstance(value, str) and value.startswith("FAILED")), value
    return value


def test_shim_is_installed_in_an_activated_cpu_rank(shim):
    assert shim["installed"] is True


def test_cuda_factory_calls_land_on_cpu(shim):
    assert _ok(shim["factories"]) == ["cpu"] * 6


def test_cuda_moves_are_no_ops(shim):
    assert _ok(shim["moves"]) == [True] * 5 + ["cpu", "torch.float64"]


def test_pin_memory_is_dropped(shim):
    assert _ok(shim["pin_memory"]) == [False, "cpu", True]


def test_tensor_type_lies_only_to_megatron(shim):
    names = _ok(shim["type_names"])
    assert names["here"] == "torch.FloatTensor"
    assert names["megatron"] == "torch.cuda.FloatTensor"
    assert names["megatron_bf16"] == "torch.cuda.BFloat16Tensor"
    assert names["megatron_vita"] == "torch.FloatTensor"  # 'megatron_vita.' is not 'megatron.'
    assert names["megatron_cast"] == "torch.float64"  # type(dtype) still converts


def test_megatron_rng_tracker_is_seeded_deterministic_and_restores_outer_state(shim):
    rng = _ok(shim["rng"])
    # megatron seeds the tensor-parallel state with seed + 2718 + tp_rank, the default with seed.
    tp_stream = torch.Generator().manual_seed(SEED + 2718)
    assert rng["first"] == torch.rand(4, generator=tp_stream).tolist()
    assert rng["second"] == torch.rand(4, generator=tp_stream).tolist()  # the fork state advances
    assert rng["restored"] is True
    assert rng["outer_draw"] == torch.rand(4, generator=torch.Generator().manual_seed(SEED)).tolist()
    assert rng["repeat"] == rng["first"]
    assert rng["other_seed"] != rng["first"]


def test_megatron_grad_norm_and_clip_run_on_cpu_tensors(shim):
    clip = _ok(shim["clip"])
    grads = torch.tensor([x for g in clip["before"] for x in g])
    assert clip["l2"] == pytest.approx(torch.linalg.vector_norm(grads).item(), rel=1e-5)
    assert clip["linf"] == pytest.approx(grads.abs().max().item(), rel=1e-6)
    assert clip["l2"] > 1.0  # so clipping to 1.0 must have scaled the grads
    after = torch.tensor([x for g in clip["after"] for x in g])
    torch.testing.assert_close(after, grads / (clip["l2"] + 1e-6))


def test_megatron_rotary_embedding_forward_runs_on_cpu(shim):
    rope = _ok(shim["rope"])
    assert rope["shape"] == [ROPE_LEN, 1, 1, ROPE_DIM] and rope["device"] == "cpu"
    inv_freq = 1.0 / (10000 ** (torch.arange(0, ROPE_DIM, 2, dtype=torch.float32) / ROPE_DIM))
    freqs = torch.outer(torch.arange(ROPE_LEN, dtype=torch.float32), inv_freq)
    expected = torch.cat([freqs, freqs], dim=-1)
    torch.testing.assert_close(torch.tensor(rope["values"]).view(ROPE_LEN, ROPE_DIM), expected)


def test_every_torch_cuda_change_is_listed_with_a_reason(shim):
    changes = _ok(shim["changes"])
    assert all(changes["reasons"]) and changes["listed"][0].startswith("torch function mode")
    assert sorted(changes["listed"][1:]) == sorted(changes["found"]) and len(changes["found"]) >= 20
    # One object per torch.cuda function: torch._dynamo refuses one object standing for two.
    assert changes["distinct"] is True
    # megatron's own CUDA RNG hooks are megatron-core patches (parallel/megatron_patches), applied too.
    assert changes["megatron_rng_hooks"] == [True, True]


NO_SHIM_SCRIPT = """
import json, torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
p = torch.nn.Parameter(torch.zeros(3))
p.grad = torch.ones(3)
out = {"shim_loaded": "megatron_vita.platform.cpu_shim" in __import__("sys").modules}
for name, call in [("grad_norm", lambda: get_grad_norm_fp32([p.grad])),
                   ("clip", lambda: clip_grad_by_total_norm_fp32([p], 1.0, 10.0)),
                   ("rope", lambda: RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(4))]:
    try:
        call()
        out[name] = "ok"
    except Exception as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def test_negative_control_the_same_calls_fail_without_the_shim():
    proc = subprocess.run([sys.executable, "-c", NO_SHIM_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shim_loaded"] is False
    assert "CUDA" in out["grad_norm"]  # torch.tensor(..., device='cuda')
    assert out["clip"].startswith("AssertionError")  # grad.type() == 'torch.cuda.FloatTensor'
    assert "CUDA" in out["rope"]  # torch.cuda.current_device()
