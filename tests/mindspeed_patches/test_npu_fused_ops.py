"""The fused-op NPU features against the torch_npu EMULATION (tests/emulation/torch_npu/ops.py).

Nothing here ran on an NPU. Two parts:

1. The emulation itself: npu_rms_norm, npu_swiglu and npu_rotary_mul equal references written
   independently (division by the RMS; silu on explicit halves; RoPE as a complex rotation of
   (x[i], x[i + D/2]) pairs, or of adjacent pairs for 'interleave'), values and gradients; and
   every documented contract violation raises ContractError. The violations are written as the
   glue bugs they stand for (RoPE on the packed [t, h, d] tensor, cos left in fp32 under bf16,
   freqs squeezed to [s, d], a non-contiguous SwiGLU input, gamma in another dtype ...), so a
   test running the glue against the emulation catches them.
2. The model: the megatron Long-VITA (ViT + projector + Qwen2) from the same checkpoint, with
   --use-fused-rmsnorm, --use-fused-swiglu and --use-fused-rotary-pos-emb applied vs not, gives
   the same logits and the same gradient for every parameter (fp32, <= 1e-5 relative) on a dense
   image + text batch and on packed documents (thd, one of 1 token), at TP 1 and TP 2, in one
   spawn of 2 gloo ranks. The emulation counts its calls, so the patched runs are shown to
   reach every op (and the unpatched ones none): the test cannot pass by patching nothing.
   The same ranks then run the patched model in bf16 at TP 2 with sequence parallelism, where
   the dtype rules of the contracts bite (no ContractError, finite logits and gradients).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mv_testlib import collate, multimodal_batch, spawn, text_ids

EMULATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emulation")
TOLERANCE = 1e-5
FLAGS = ("use-fused-rmsnorm", "use-fused-swiglu", "use-fused-rotary-pos-emb")
OPS = ("npu_rms_norm", "npu_swiglu", "npu_rotary_mul")
DOC_LENGTHS = (9, 1, 13, 5)  # packed into 32 tokens: 4 of padding form their own segment


@pytest.fixture
def npu(monkeypatch):
    """The emulation as `torch_npu`, for this test only (spawned ranks inherit sys.path)."""
    monkeypatch.syspath_prepend(EMULATION)
    import torch_npu

    assert torch_npu.IS_EMULATION is True
    yield torch_npu
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rope_reference(x, theta, interleaved):
    """x rotated by angle theta per pair, as complex multiplication (float64)."""
    x = x.double()
    if interleaved:
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        out = torch.view_as_real(pairs * torch.polar(torch.ones_like(theta), theta)).flatten(-2)
        return out
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h], x[..., h:]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((z.real, z.imag), dim=-1)


# -- 1. the emulation ------------------------------------------------------------------------------

def test_rms_norm_equals_reference_values_rstd_and_gradients(npu):
    for shape, gamma_shape in (((6, 2, 16), (16,)), ((3, 4, 5, 8), (5, 8))):
        x = _rand(*shape, seed=1).requires_grad_()
        g = (0.5 + _rand(*gamma_shape, seed=2).abs()).requires_grad_()
        y, rstd = npu.npu_rms_norm(x, g, epsilon=1e-6)
        dims = tuple(range(x.dim() - g.dim(), x.dim()))
        x64, g64 = x.detach().double().requires_grad_(), g.detach().double().requires_grad_()
        ref = x64 / (x64.pow(2).mean(dims, keepdim=True) + 1e-6).sqrt() * g64
        assert (y.double() - ref).abs().max() < 1e-6
        assert rstd.dtype == torch.float32
        assert rstd.shape == tuple(n if i < x.dim() - g.dim() else 1 for i, n in enumerate(shape))
        w = _rand(*shape, seed=3)
        (y * w).sum().backward()
        (ref * w.double()).sum().backward()
        assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
        assert torch.allclose(g.grad.double(), g64.grad, atol=1e-5)
    y16, rstd16 = npu.npu_rms_norm(_rand(4, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and rstd16.dtype == torch.float32 and rstd16.shape == (4, 1)


def test_swiglu_gate_is_the_first_half_values_and_gradients(npu):
    for dim in (-1, 0, 1):
        x = _rand(4, 6, 10, seed=4).requires_grad_()
        out = npu.npu_swiglu(x, dim=dim)
        x64 = x.detach().double().requires_grad_()
        h = x.shape[dim] // 2
        gate, up = x64.narrow(dim, 0, h), x64.narrow(dim, h, h)
        ref = gate / (1 + torch.exp(-gate)) * up
        assert (out.double() - ref).abs().max() < 1e-6
        w = _rand(*ref.shape, seed=5)
        (out * w).sum().backward()
        (ref * w.double()).sum().backward()
        assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)


@pytest.mark.parametrize("mode", ["half", "interleave"])
def test_rotary_mul_is_a_rotation_in_every_layout(npu, mode):
    s, b, n, d = 7, 2, 3, 8
    theta = _rand(s, d // 2, seed=6)  # one angle per pair
    # r1 / r2 per pair position: 'half' repeats the angles as [t, t], 'interleave' as [t0, t0, t1, t1, ..]
    angles = theta.repeat_interleave(2, -1) if mode == "interleave" else torch.cat((theta, theta), -1)
    cos, sin = angles.cos(), angles.sin()
    layouts = {  # name: (x, r1-shaped view of the angles, theta broadcast against x's pairs)
        "SBND/S11D": (_rand(s, b, n, d, seed=7), lambda t: t[:, None, None], theta[:, None, None]),
        "BSND/1S1D": (_rand(b, s, n, d, seed=8), lambda t: t[None, :, None], theta[None, :, None]),
        "BNSD/11SD": (_rand(b, n, s, d, seed=9), lambda t: t[None, None], theta[None, None]),
    }
    for name, (x, view, th) in layouts.items():
        x = x.requires_grad_()
        out = npu.npu_rotary_mul(x, view(cos), view(sin), rotary_mode=mode)
        x64 = x.detach().double().requires_grad_()
        ref = _rope_reference(x64, th.double().expand(*x.shape[:-1], d // 2), mode == "interleave")
        assert (out.double() - ref).abs().max() < 1e-6, name
        w = _rand(*x.shape, seed=10)
        (out * w).sum().backward()
        (ref * w.double()).sum().backward()
        assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5), name


def _violations():
    x, g = _rand(6, 2, 16), torch.ones(16)
    q = _rand(5, 1, 2, 8)  # one packed document as megatron's thd RoPE hands it over: [len, 1, n, d]
    cos, sin = torch.ones(5, 1, 1, 8), torch.zeros(5, 1, 1, 8)
    bf = torch.bfloat16
    return {
        "rms_norm: gamma left in fp32 under bf16": lambda n: n.npu_rms_norm(x.to(bf), g),
        "rms_norm: gamma not the trailing dims": lambda n: n.npu_rms_norm(x, torch.ones(2)),
        "rms_norm: gamma of a wider hidden size": lambda n: n.npu_rms_norm(x, torch.ones(32)),
        "rms_norm: gamma with more dims than x": lambda n: n.npu_rms_norm(x[0], torch.ones(1, 2, 16)),
        "rms_norm: 1-D input": lambda n: n.npu_rms_norm(x[0, 0], g),
        "rms_norm: float64": lambda n: n.npu_rms_norm(x.double(), g.double()),
        "rms_norm: epsilon 0": lambda n: n.npu_rms_norm(x, g, epsilon=0.0),
        "rms_norm: epsilon as a string": lambda n: n.npu_rms_norm(x, g, epsilon="1e-6"),
        "swiglu: odd split dim": lambda n: n.npu_swiglu(_rand(4, 7)),
        "swiglu: dim out of range": lambda n: n.npu_swiglu(_rand(4, 8), dim=2),
        "swiglu: non-contiguous input (a transposed fc1 output)": lambda n: n.npu_swiglu(_rand(8, 4).t()),
        "swiglu: empty input": lambda n: n.npu_swiglu(torch.empty(0, 8)),
        "swiglu: integer input": lambda n: n.npu_swiglu(torch.ones(2, 8, dtype=torch.int32)),
        "swiglu: 9-D input": lambda n: n.npu_swiglu(torch.ones((1,) * 8 + (2,))),
        "rotary: the packed [t, h, d] tensor, not unsqueezed": lambda n: n.npu_rotary_mul(q[:, 0], cos, sin),
        "rotary: freqs squeezed to [s, d]": lambda n: n.npu_rotary_mul(q, cos[:, 0, 0], sin[:, 0, 0]),
        "rotary: cos/sin left in fp32 under bf16": lambda n: n.npu_rotary_mul(q.to(bf), cos, sin),
        "rotary: cos and sin of different shapes": lambda n: n.npu_rotary_mul(q, cos, sin[:1]),
        "rotary: cos/sin fitting no layout": lambda n: n.npu_rotary_mul(_rand(6, 2, 3, 8), cos[:1], sin[:1]),
        "rotary: odd head dim": lambda n: n.npu_rotary_mul(_rand(5, 1, 2, 7), cos[..., :7], sin[..., :7]),
        "rotary: head dim 896": lambda n: n.npu_rotary_mul(torch.ones(1, 1, 1, 896), torch.ones(1, 1, 1, 896),
                                                            torch.zeros(1, 1, 1, 896)),
        "rotary: cos scaled out of [-1, 1] (mscale)": lambda n: n.npu_rotary_mul(q, 2 * cos, sin),
        "rotary: unknown rotary_mode": lambda n: n.npu_rotary_mul(q, cos, sin, rotary_mode="rotate_half"),
        "rotary: B = 1000": lambda n: n.npu_rotary_mul(torch.zeros(1000, 1000, 1, 2), torch.ones(1000, 1, 1, 2),
                                                      torch.zeros(1000, 1, 1, 2)),
        "rotary: B*N > 1024 with cos/sin needing gradients": lambda n: n.npu_rotary_mul(
            torch.zeros(2, 600, 2, 8), torch.ones(2, 1, 1, 8, requires_grad=True), torch.zeros(2, 1, 1, 8)),
    }


@pytest.mark.parametrize("case", list(_violations()))
def test_contract_violation_raises(npu, case):
    before = dict(npu.CALLS)
    with pytest.raises(npu.ContractError):
        _violations()[case](npu)
    assert dict(npu.CALLS) == before  # a refused call is not counted as reaching the op


def test_contract_edges_that_are_allowed(npu):
    """The limits themselves pass: D = 894, 1-token documents, B*N = 1024 with cos/sin gradients."""
    npu.npu_rotary_mul(torch.ones(1, 1, 1, 894), torch.ones(1, 1, 1, 894), torch.zeros(1, 1, 1, 894))
    npu.npu_rotary_mul(_rand(1, 1, 2, 8), torch.ones(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    npu.npu_rotary_mul(torch.zeros(2, 512, 2, 8), torch.ones(2, 1, 1, 8, requires_grad=True), torch.zeros(2, 1, 1, 8))
    npu.npu_rms_norm(_rand(3, 16, dtype=torch.float16), torch.ones(16, dtype=torch.float16), epsilon=1e-5)
    npu.npu_swiglu(_rand(2, 2, dtype=torch.bfloat16), dim=-2)


def test_features_import_neither_torch_nor_torch_npu():
    code = ("import sys, mindspeed_patches\n"
            "names = [f.name for f in mindspeed_patches.FEATURES]\n"
            "print(names, 'torch' in sys.modules, 'torch_npu' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=EMULATION + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    names, has_torch, has_npu = out.stdout.strip().rsplit(" ", 2)
    assert all(f"'{flag}'" in names for flag in FLAGS), names
    assert (has_torch, has_npu) == ("False", "False"), out.stdout


# -- 2. the model, patched vs not ------------------------------------------------------------------

def _packed_batch(cfg):
    from megatron_vita.data.packing import collate_packs

    gen = torch.Generator().manual_seed(5)
    docs = [text_ids(cfg, n, gen) for n in DOC_LENGTHS]
    no_tiles = np.zeros((0, cfg.vision.image_size, cfg.vision.image_size, 3), dtype=np.uint8)
    rows = [[(ids, ids[1:] + [-100], no_tiles) for ids in docs]]
    return collate_packs(rows, 32, pad_id=0, reset=True, num_image_token=cfg.num_image_token,
                         context_ids=cfg.tokens.context_ids, image_size=cfg.vision.image_size, with_cu_seqlens=True)


def _logits_and_grads(model, batch):
    """Full-vocabulary logits of one batch, and every parameter's gradient of a fixed linear loss."""
    from megatron_vita.parallel.pipeline import model_inputs

    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(**model_inputs(batch), runtime_gather_output=True)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11))
    (logits.float() * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().clone(), grads


def _run(rank, world, hf_dir):
    import torch_npu

    import mindspeed_patches
    from megatron_vita import platform
    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.state import parallel_layout

    assert torch_npu.IS_EMULATION is True
    cfg = ModelConfig.from_hf_dir(hf_dir)
    batches = {"dense": collate(multimodal_batch(cfg, ("image1", "text"), seq_len=32, seed=3)),
               "packed": _packed_batch(cfg)}
    out = {"cu_seqlens": batches["packed"]["cu_seqlens"].tolist()}
    plain = {}
    # Unpatched runs first: the features stay applied for the rest of the process.
    for patched in (False, True):
        if patched:
            # what every command's ranks do with the kernel flags (the emulation lets them run on cpu)
            plat = platform.activate("cpu", features=FLAGS)
            out["enabled"] = [list(plat.features), mindspeed_patches.apply_for_npu()]
        for tp in (1, 2):
            par = ParallelConfig(tensor_model_parallel_size=tp)
            with parallel_layout(par):
                model = build_model_chunks(cfg, par)[0]
                load_hf_weights([model], HFSource(hf_dir), cfg, par)
                for name, batch in batches.items():
                    key = f"tp{tp}_{name}"
                    calls = dict(torch_npu.CALLS)
                    logits, grads = _logits_and_grads(model, batch)
                    calls = {op: torch_npu.CALLS[op] - calls.get(op, 0) for op in OPS}
                    if not patched:
                        plain[key] = (logits, grads)
                        out[f"{key}_plain_calls"] = calls
                        continue
                    ref_logits, ref_grads = plain[key]
                    out[key] = dict(
                        calls=calls,
                        logits=float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
                        params=sorted(grads) == sorted(ref_grads) and len(grads),
                        grads={p: float((g - ref_grads[p]).norm() / ref_grads[p].norm().clamp(min=1e-12))
                               for p, g in grads.items() if p in ref_grads})
    # NPUs train in bf16: there the glue must meet the dtype rules too (gamma, cos / sin in x's
    # dtype), also under sequence parallelism, where the norms see [s/tp, b, h].
    par = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    with parallel_layout(par):
        model = build_model_chunks(cfg, par, BuildOptions(params_dtype=torch.bfloat16))[0]
        load_hf_weights([model], HFSource(hf_dir), cfg, par)
        for name, batch in batches.items():
            batch = {k: v.bfloat16() if k == "pixel_values" else v for k, v in batch.items()}
            calls = dict(torch_npu.CALLS)
            logits, grads = _logits_and_grads(model, batch)
            out[f"bf16_tp2_sp_{name}"] = dict(
                calls={op: torch_npu.CALLS[op] - calls.get(op, 0) for op in OPS}, dtype=str(logits.dtype),
                finite=bool(torch.isfinite(logits).all()) and all(bool(torch.isfinite(g).all()) for g in grads.values()))
    return out


@pytest.mark.timeout(240)
def test_patched_model_equals_unpatched_logits_and_every_gradient(npu, tiny_hf_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", EMULATION + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reports = spawn(_run, 2, tiny_hf_dir, timeout=220)
    failures = []
    for rank, report in enumerate(reports):
        assert report["cu_seqlens"] == [0, 9, 10, 23, 28, 32], report["cu_seqlens"]
        assert report["enabled"] == [list(FLAGS)] * 2, report["enabled"]
        for key in ("tp1_dense", "tp1_packed", "tp2_dense", "tp2_packed"):
            r = report[key]
            assert report[f"{key}_plain_calls"] == dict.fromkeys(OPS, 0), (key, report[f"{key}_plain_calls"])
            # per layer: 2 norms + final norm, 1 SwiGLU, RoPE on q and k (packed: per document)
            assert all(r["calls"][op] > 0 for op in OPS), (rank, key, r["calls"])
            assert r["params"], f"rank {rank} {key}: the two runs have different parameters"
            if r["logits"] > TOLERANCE:
                failures.append(f"rank {rank} {key}: logits relative max diff {r['logits']:.2e}")
            failures += [f"rank {rank} {key} grad {p}: relative error {e:.2e}"
                         for p, e in r["grads"].items() if not e <= TOLERANCE]
        for key in ("bf16_tp2_sp_dense", "bf16_tp2_sp_packed"):
            r = report[key]
            assert r["dtype"] == "torch.bfloat16" and r["finite"], (rank, key, r)
            assert all(r["calls"][op] > 0 for op in OPS), (rank, key, r["calls"])
        # the packed run hands RoPE one call per document (and the padding segment) for q and k
        assert report["tp1_packed"]["calls"]["npu_rotary_mul"] > report["tp1_dense"]["calls"]["npu_rotary_mul"]
    assert not failures, "\n".join(failures[:40])
