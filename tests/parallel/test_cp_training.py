"""Training under context parallelism equals CP 1: loss and every gradient, ring / Ulysses / hybrid.

The whole Long-VITA (ViT + projector + LLM) from one set of weights takes a training step on the
same global batch at CP 1 and at CP 2 and CP 4 (ring without send/recv overlap, ring, Ulysses,
hybrid: 2 Ulysses x 2 ring ranks), TP 2 x CP 2 with sequence parallelism and PP 2 x CP 2 (ring
and Ulysses), and with full and selective recompute, at CP 1 and under CP. The batch holds packed documents of odd lengths (one of 1 token), images
of 1 and 3 tiles and video frames whose feature tokens straddle the chunk boundaries, and
supervised tokens on both sides of every boundary; its micro-batches come in the three shapes
the split handles: packed by the loader for CP (documents pre-padded, cu_seqlens_padded),
packed without that (padded by the split), and unpacked causal rows. Every gradient of every
parameter after step 1 (megatron's main_grad, reduced over DP x CP) is compared with the CP 1
run of the same TP / PP layout, rank by rank. Every layout runs in one spawn of 4 gloo ranks:
a layout that does not fill the world is replicated over DP with every DP rank given the same
micro-batches, which leaves loss and gradients those of DP 1.
"""
import pytest
import torch

from mv_testlib import IGNORE, rel_diff, sample, spawn, text_ids

TOLERANCE = 1e-5
ALIGN = 8  # a multiple of every layout's CP multiple (CP 4: 8; CP 2: 4; CP 2 x TP 2 with SP: 4)


def _document(cfg, kind, n, gen):
    """A document of n tokens supervised everywhere inside it (labels pre-shifted)."""
    if kind == "text":
        tokens = torch.tensor(text_ids(cfg, n, gen))
        pixels = torch.empty(0, 3, cfg.vision.image_size, cfg.vision.image_size)
    else:
        s = sample(cfg, kind, n, gen)
        tokens, pixels = s["tokens"][0], s["pixel_values"]
    labels = torch.full_like(tokens, IGNORE)
    labels[:-1] = tokens[1:]
    return tokens, labels, pixels


def _pack(docs, seq, align=1):
    """One packed row with cu_seqlens; align > 1 lays it out as the loader does under CP."""
    tokens = torch.zeros(seq, dtype=torch.long)
    labels = torch.full((seq,), IGNORE, dtype=torch.long)
    cu, cu_padded, at = [0], [0], 0
    for t, lab, _ in docs:
        n = t.numel()
        tokens[at:at + n], labels[at:at + n] = t, lab
        at += -(-n // align) * align
        cu.append(cu[-1] + n)
        cu_padded.append(at)
    assert at <= seq
    if at < seq:
        cu.append(cu[-1] + seq - at)
        cu_padded.append(seq)
    batch = {"tokens": tokens[None], "labels": labels[None], "loss_mask": (labels != IGNORE).float()[None],
             "pixel_values": torch.cat([d[2] for d in docs]), "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    if align > 1:
        batch["cu_seqlens_padded"] = torch.tensor(cu_padded, dtype=torch.int32)
    return batch


def _microbatches(cfg, pipelined: bool):
    gen = torch.Generator().manual_seed(7)
    docs_a = [_document(cfg, k, n, gen) for k, n in (("image3", 29), ("text", 1), ("video2", 21), ("text", 9),
                                                    ("image1", 15))]
    docs_b = [_document(cfg, k, n, gen) for k, n in (("text", 5), ("video2", 31), ("image1", 15), ("text", 3))]
    aligned = [_pack(docs_a, 96, ALIGN), _pack(docs_b, 96, ALIGN)]
    if pipelined:
        return aligned  # pipeline stages exchange one activation shape: the loader's packing
    unpacked = [sample(cfg, k, 64, gen) for k in ("image3", "video2")]
    rows = {key: torch.cat([u[key] for u in unpacked]) for key in ("tokens", "labels", "loss_mask", "pixel_values")}
    return aligned + [_pack(docs_a, 80), rows]


def _main_grads(ddp):
    from megatron.core import parallel_state as ps

    key = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return key, {f"{vp}.{name}": p.main_grad.detach().clone() for vp, m in enumerate(ddp)
                 for name, p in m.module.named_parameters() if p.requires_grad}


def _run_layouts(rank, world, hf_dir, layouts):
    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.config import OptimConfig
    from megatron_vita.training.engine import train_step, wrap_ddp
    from megatron_vita.training.optimizer import build_optimizer

    cfg = ModelConfig.from_hf_dir(hf_dir)
    results = {}
    for name, layout in layouts.items():
        layout = dict(layout)
        options = BuildOptions(**layout.pop("build", {}))
        par = ParallelConfig(**layout)
        with parallel_layout(par) as info:
            chunks = build_model_chunks(cfg, par, options)
            load_hf_weights(chunks, HFSource(hf_dir), cfg, par)
            ddp = wrap_ddp(chunks)
            optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3))
            micro = _microbatches(cfg, pipelined=par.pp > 1)
            step = train_step(ddp, optimizer, micro)
            key, grads = _main_grads(ddp)
            # per DP rank: every DP rank trained the same micro-batches
            results[name] = dict(losses=[step.loss], tokens=step.supervised_tokens // info.dp_size,
                                 key=key, grads=grads)
    return results


def _cp(algo, cp, ulysses=None, **kw):
    return dict(context_parallel_size=cp, context_parallel_algo=algo, ulysses_degree_in_cp=ulysses, **kw)


TP2_SP = dict(tensor_model_parallel_size=2, sequence_parallel=True)
PP2 = dict(pipeline_model_parallel_size=2)
FULL = {"build": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}
SELECTIVE = {"build": dict(recompute_granularity="selective")}
# name -> (layout, name of the CP 1 reference with the same TP / PP / recompute)
LAYOUTS = {
    "ref": ({}, None),
    "ref_tp2_sp": (TP2_SP, None),
    "ref_pp2": (PP2, None),
    "ref_full_recompute": (FULL, "ref"),
    "ref_selective_recompute": (SELECTIVE, "ref"),
    "ring_cp4": (_cp("megatron_cp_algo", 4), "ref"),
    "ring_tp2_cp2_sp": (_cp("ring", 2, **TP2_SP), "ref_tp2_sp"),
    "ring_pp2_cp2": (_cp("ring", 2, **PP2), "ref_pp2"),
    "ring_cp2_no_overlap_full_recompute": (_cp("ring", 2, cp_send_recv_overlap=False, **FULL), "ref"),
    "ulysses_cp4": (_cp("ulysses_cp_algo", 4), "ref"),  # 2 KV heads < degree 4: repeated
    "ulysses_tp2_cp2_sp": (_cp("ulysses", 2, **TP2_SP), "ref_tp2_sp"),  # 1 KV head per TP rank < 2
    "ulysses_pp2_cp2_selective_recompute": (_cp("ulysses", 2, **PP2, **SELECTIVE), "ref_pp2"),
    "hybrid_cp4": (_cp("hybrid", 4, ulysses=2), "ref"),
}


@pytest.mark.timeout(900)
def test_context_parallel_training_equals_cp1(tiny_hf_dir):
    runs = spawn(_run_layouts, 4, tiny_hf_dir, {k: v[0] for k, v in LAYOUTS.items()}, timeout=840)
    failures = []
    for name, (_, ref_name) in LAYOUTS.items():
        if ref_name is None:
            continue
        for rank, results in enumerate(runs):
            got, ref = results[name], next(r[ref_name] for r in runs if r[ref_name]["key"] == results[name]["key"])
            for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
                if rel_diff(a, b) > TOLERANCE:
                    failures.append(f"{name} rank {rank} step {step} loss {a:.8f} vs {ref_name} {b:.8f}")
            if got["tokens"] != ref["tokens"]:
                failures.append(f"{name}: {got['tokens']} supervised tokens vs {ref['tokens']}")
            if set(got["grads"]) != set(ref["grads"]):
                failures.append(f"{name} rank {rank}: parameters differ from {ref_name}")
                continue
            for pname, g in got["grads"].items():
                r = ref["grads"][pname]
                err = float((g - r).norm() / r.norm().clamp(min=1e-12))
                if err > TOLERANCE:
                    failures.append(f"{name} rank {rank} grad {pname}: relative error {err:.2e}")
    assert not failures, "\n".join(failures[:40])
    # the ViT trains in this test, and its gradients are among those compared
    assert any("vision_model" in p and float(g.norm()) > 0 for p, g in runs[0]["ring_cp4"]["grads"].items())
