"""The NPU-patched megatron model equals the unpatched one, on CPU against the torch_npu EMULATION.

In each of 2 spawned gloo ranks the whole Long-VITA (ViT + projector + LLM), from one set of HF
weights, runs every case first unpatched, then with every NPU feature of
mindspeed_patches.FEATURES switched on (--use-flash-attn, and the fused RMSNorm / SwiGLU / RoPE
features where present); the fused ops resolve to tests/emulation/torch_npu. Compared, fp32,
<= 1e-5 relative: the logits (forward_only) and every parameter's gradient after one training
step (megatron's main_grad), rank by rank, for
  cp1       a dense row of an image and a video (LLM causal SBH sparse_mode 2, ViT SBH unmasked)
            and a packed row of documents of odd lengths, one of 1 token (thd -> TND);
  ring_cp2  ring context parallelism over both ranks, the packed row pre-padded for CP and the
            dense one (each ring step's block through the kernel, merged from softmax_max / sum,
            and its gradients through npu_fusion_attention_grad fed the final statistics);
and, at the attention-leaf level, KV-cache decoding (queries fewer than keys, sbhd and thd)
against the last rows of the full sequence, and megatron's broadcast padding mask; a CP 2
decoding step through the engine's cached leaf (each rank's partial through the kernel, merged)
against the full softmax. The emulation's call counter proves the patched
path ran in each case (a patched model that silently kept the torch leaves would fail).
"""
import os

import pytest
import torch

from mv_testlib import IGNORE, sample, spawn, text_ids

TOLERANCE = 1e-5
EMULATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emulation")


def _pack(cfg, gen, kinds_lengths, seq, align=1):
    """One packed row of documents (labels pre-shifted inside each), cu_seqlens (+ _padded when align > 1)."""
    tokens = torch.zeros(seq, dtype=torch.long)
    labels = torch.full((seq,), IGNORE, dtype=torch.long)
    pixels, cu, cu_padded, at = [], [0], [0], 0
    for kind, n in kinds_lengths:
        if kind == "text":
            t = torch.tensor(text_ids(cfg, n, gen))
        else:
            s = sample(cfg, kind, n, gen)
            t = s["tokens"][0]
            pixels.append(s["pixel_values"])
        tokens[at:at + n] = t
        labels[at:at + n - 1] = t[1:]
        at += -(-n // align) * align
        cu.append(cu[-1] + n)
        cu_padded.append(at)
    if at < seq:  # the row's tail is one more (padding) document
        cu.append(cu[-1] + seq - at)
        cu_padded.append(seq)
    size = cfg.vision.image_size
    batch = {"tokens": tokens[None], "labels": labels[None], "loss_mask": (labels != IGNORE).float()[None],
             "pixel_values": torch.cat(pixels) if pixels else torch.empty(0, 3, size, size),
             "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    if align > 1:
        batch["cu_seqlens_padded"] = torch.tensor(cu_padded, dtype=torch.int32)
    return batch


def _batches(cfg):
    gen = torch.Generator().manual_seed(11)
    rows = [sample(cfg, k, 40, gen) for k in ("image3", "video2")]
    dense = {key: torch.cat([r[key] for r in rows]) for key in ("tokens", "labels", "loss_mask", "pixel_values")}
    docs = (("image1", 17), ("text", 1), ("video2", 21), ("text", 7))
    return {"cp1": [dense, _pack(cfg, gen, docs, 56)], "ring_cp2": [_pack(cfg, gen, docs, 64, align=4), dense]}


# layout -> its micro-batches (above): one dense and one packed row each, trained in one step
CASES = {"cp1": {}, "ring_cp2": dict(context_parallel_size=2, context_parallel_algo="ring")}


def _run_case(cfg, hf_dir, layout, batches):
    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.pipeline import forward_only
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.config import OptimConfig
    from megatron_vita.training.engine import train_step, wrap_ddp
    from megatron_vita.training.optimizer import build_optimizer

    par = ParallelConfig(**layout)
    with parallel_layout(par):
        chunks = build_model_chunks(cfg, par)
        load_hf_weights(chunks, HFSource(hf_dir), cfg, par)
        leaves = sorted({type(m).__name__ for c in chunks for n, m in c.named_modules() if n.endswith("core_attention")})
        logits = [forward_only(chunks, [b])[0] for b in batches]
        ddp = wrap_ddp(chunks)
        step = train_step(ddp, build_optimizer(ddp, OptimConfig(lr=1e-3)), batches)
        grads = {name: p.main_grad.detach().clone() for m in ddp for name, p in m.module.named_parameters()
                 if p.requires_grad}
    return dict(logits=logits, loss=step.loss, grads=grads, leaves=leaves)


def _decode(core_cls):
    """KV-cache decoding at the leaf: (the last 3 queries vs all keys, the full sequence) outputs and
    the gradients of a loss on the last 3 rows, sbhd and thd (documents of 4 and 6 keys, 1 and 2
    queries); and sbhd with megatron's broadcast padding mask."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               kv_channels=8, attention_dropout=0.0)
    core = core_cls(config, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(2)
    out = {}
    q, k, v = (torch.randn(9, 2, h, 8, generator=gen).requires_grad_() for h in (4, 2, 2))
    w = torch.randn(3, 2, 32, generator=gen)
    for name, query in (("sbhd_decode", q[-3:]), ("sbhd_full", q)):
        o = core(query, k, v, None)[-3:]
        out[name] = (o.detach(), *torch.autograd.grad((o * w).sum(), (q, k, v)))
    padding = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    padding[0, ..., 6:] = True  # row 0's last 3 keys are padding (megatron's broadcast [b, 1, 1, sk] mask)
    o = core(q, k, v, padding, attn_mask_type=AttnMaskType.padding)
    out["sbhd_padding"] = (o.detach(), *torch.autograd.grad((o[-3:] * w).sum(), (q, k, v)))
    q, k, v = (torch.randn(10, h, 8, generator=gen).requires_grad_() for h in (4, 2, 2))
    last = [3, 8, 9]  # the last query of document 0 (keys 0-3), the last two of document 1 (keys 4-9)
    w = torch.randn(3, 32, generator=gen)
    cu_kv = torch.tensor([0, 4, 10], dtype=torch.int32)
    for name, query, cu_q in (("thd_decode", q[last], torch.tensor([0, 1, 3], dtype=torch.int32)),
                              ("thd_full", q, cu_kv)):
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, max_seqlen_q=6,
                                 max_seqlen_kv=6)
        o = core(query, k, v, None, packed_seq_params=params)
        o = o if name == "thd_decode" else o[last]
        out[name] = (o.detach(), *torch.autograd.grad((o * w).sum(), (q, k, v)))
    return out


def _run_decode(core_cls):
    from megatron_vita.config import ParallelConfig
    from megatron_vita.parallel.state import parallel_layout

    with parallel_layout(ParallelConfig()):
        return _decode(core_cls)


def _cp_decode(core_cls):
    """A KV-cache decoding step at CP 2 through the engine's cached leaf: each rank holds its own
    keys (positions 0-9 split unevenly), the new token (position 10) is replicated, rank 0 keeps its
    key; the merged output and the full softmax over all 11 keys computed here."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vita.config import ParallelConfig
    from megatron_vita.inference.engine.kv_cache import CachedAttention, KVCache, Step
    from megatron_vita.parallel.state import parallel_layout

    with parallel_layout(ParallelConfig(context_parallel_size=2)):
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                   kv_channels=8, attention_dropout=0.0, context_parallel_size=2)
        cache = KVCache()
        cached = CachedAttention(core_cls(config, 1, AttnMaskType.causal, "self"), cache, 0)
        gen = torch.Generator().manual_seed(4)
        keys, values = torch.randn(11, 1, 2, 8, generator=gen), torch.randn(11, 1, 2, 8, generator=gen)
        query = torch.randn(1, 1, 4, 8, generator=gen)
        rank = ps.get_context_parallel_rank()
        mine = torch.tensor([[0, 1, 2, 7, 8, 9], [3, 4, 5, 6]][rank])
        kv = cache.layer(0)
        kv.reserve(keys[:1], 12)
        kv.append(keys[mine], values[mine], mine)
        cache.step = Step("decode", torch.tensor([10]), keep=torch.tensor([rank == 0]),
                          group=ps.get_context_parallel_group())
        out = cached(query, keys[10:], values[10:], None).reshape(1, 4, 8)
        full = torch.softmax(torch.einsum("hd,khd->hk", query[0, 0], keys[:, 0].repeat_interleave(2, 1))
                             * cached.scale, -1)
        expected = torch.einsum("hk,khd->hd", full, values[:, 0].repeat_interleave(2, 1))
    return out[0], expected


def _apply_features():
    """Switch every NPU feature on in this rank (activate(features=) where the platform has it)."""
    import argparse
    import inspect

    import mindspeed_patches
    from megatron_vita import platform

    names = [f.name for f in mindspeed_patches.FEATURES]
    if "features" in inspect.signature(platform.activate).parameters:
        platform.activate("cpu", features=names, mindspeed=False)
    else:
        mindspeed_patches.apply_for_npu(argparse.Namespace(**{n.replace("-", "_"): True for n in names}),
                                        use_mindspeed=False)
    applied = {e.function.rsplit(".", 1)[-1] for e in mindspeed_patches.REGISTRY.entries() if e.applied}
    return names, applied


def _rank(rank, world, hf_dir):
    import sys

    sys.path.insert(0, EMULATION)
    from megatron_vita.config import ModelConfig
    from megatron_vita.models.common.attention import CoreAttention
    from torch_npu import fusion_attention as emulation

    cfg = ModelConfig.from_hf_dir(hf_dir)
    batches = _batches(cfg)
    ref = {name: _run_case(cfg, hf_dir, layout, batches[name]) for name, layout in CASES.items()}
    ref_decode = _run_decode(CoreAttention)
    from megatron_vita.parallel.context.leaf import ContextParallelAttention

    ref_cp_decode = _cp_decode(ContextParallelAttention)
    assert not emulation.CALLS, "the unpatched model called the NPU emulation"
    features, applied = _apply_features()
    from mindspeed_patches.features.npu_attention import NPUCoreAttention

    got, calls = {}, {}
    for name, layout in CASES.items():
        before = dict(emulation.CALLS)
        got[name] = _run_case(cfg, hf_dir, layout, batches[name])
        calls[name] = {key: n - before.get(key, 0) for key, n in emulation.CALLS.items() if n > before.get(key, 0)}
    before = dict(emulation.CALLS)
    got_decode = _run_decode(NPUCoreAttention)
    calls["decode"] = {key: n - before.get(key, 0) for key, n in emulation.CALLS.items() if n > before.get(key, 0)}
    from mindspeed_patches.features.npu_attention import NPUContextParallelAttention

    before = dict(emulation.CALLS)
    got_cp_decode = _cp_decode(NPUContextParallelAttention)
    calls["cp_decode"] = {key: n - before.get(key, 0) for key, n in emulation.CALLS.items() if n > before.get(key, 0)}
    return dict(ref=ref, got=got, ref_decode=ref_decode, got_decode=got_decode, calls=calls, features=features,
                applied=applied, ref_cp_decode=ref_cp_decode, got_cp_decode=got_cp_decode)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.timeout(240)
def test_npu_patched_model_equals_unpatched(tiny_hf_dir):
    runs = spawn(_rank, 2, tiny_hf_dir, timeout=220)
    failures = []
    for rank, run in enumerate(runs):
        assert "use-flash-attn" in run["features"]
        assert "select_leaves_wrapper" in run["applied"]
        for name in CASES:
            ref, got = run["ref"][name], run["got"][name]
            assert ref["leaves"] != got["leaves"], f"{name}: the patched model kept the leaves {ref['leaves']}"
            assert all(leaf.startswith("NPU") for leaf in got["leaves"]), got["leaves"]
            for i, (a, b) in enumerate(zip(got["logits"], ref["logits"])):
                if _rel(a, b) > TOLERANCE:
                    failures.append(f"rank {rank} {name} micro-batch {i} logits: {_rel(a, b):.2e}")
            assert set(got["grads"]) == set(ref["grads"])
            for pname, g in got["grads"].items():
                if _rel(g, ref["grads"][pname]) > TOLERANCE:
                    failures.append(f"rank {rank} {name} grad {pname}: {_rel(g, ref['grads'][pname]):.2e}")
            assert any("vision_model" in p and float(g.norm()) > 0 for p, g in got["grads"].items())
        for got, ref in (("sbhd_decode", "sbhd_full"), ("thd_decode", "thd_full"), ("sbhd_padding", "sbhd_padding")):
            for what, a, b in zip(("out", "dq", "dk", "dv"), run["got_decode"][got], run["ref_decode"][ref]):
                if _rel(a, b) > TOLERANCE:
                    failures.append(f"rank {rank} leaf {got} {what}: {_rel(a, b):.2e}")
        for which in ("ref_cp_decode", "got_cp_decode"):
            out, expected = run[which]
            if _rel(out, expected) > TOLERANCE:
                failures.append(f"rank {rank} {which}: {_rel(out, expected):.2e} from the full softmax")
    assert not failures, "\n".join(failures[:40])
    for run in runs:
        calls = run["calls"]
        # which kernel calls each case made: proof that the NPU path, in the expected form, ran
        # dense: the LLM as SBH causal, the ViT as SBH unmasked; packed: the LLM as TND
        assert set(calls["cp1"]) == {("SBH", 2), ("SBH", 0), ("TND", 3)}, calls["cp1"]
        # ring: diagonal blocks causal, the others unmasked, all BNSD, forward and backward (the
        # gradient kernel); the ViT (never split) as SBH through autograd of the forward kernel
        assert set(calls["ring_cp2"]) == {("BNSD", 2), ("BNSD", 0), ("SBH", 0), ("grad", "BNSD", 2),
                                          ("grad", "BNSD", 0)}, calls["ring_cp2"]
        assert not any(key[0] == "grad" for case in ("cp1", "decode") for key in calls[case])
        assert calls["decode"] == {("SBH", 3): 1, ("SBH", 2): 1, ("SBH", 0): 1, ("TND", 3): 2}, calls["decode"]
        # CP decoding: each rank's partial over its own cache through the kernel (unmasked BNSD)
        assert calls["cp_decode"] == {("BNSD", 0): 1}, calls["cp_decode"]
