"""Loss and gradient norm of the full model are the same under every parallel layout.

Two Adam steps of the whole Long-VITA (ViT + projector + LLM) on one global batch of four
image/video/text sequences, from the same weights, at (TP, PP, DP) = (1,1,1) and at
(2,1,1)+SP, (1,2,1), (1,1,2)+distributed optimizer, (1,2,1) with VPP=2, (2,2,1)+SP+dist-opt
and (2,1,2)+SP+dist-opt. Step 2 depends on step 1's update, so the optimizer (including the
sharded distributed optimizer) is covered, not just the forward/backward.
"""
import torch

from mv_testlib import multimodal_batch, rel_diff, spawn

STEPS = 2
TOLERANCE = 1e-5


def _run_layouts(rank, world, hf_dir, layouts):
    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.engine import train_step, wrap_ddp
    from megatron_vita.training.config import OptimConfig
    from megatron_vita.training.optimizer import build_optimizer

    cfg = ModelConfig.from_hf_dir(hf_dir)
    batch = multimodal_batch(cfg, seq_len=32)
    results = {}
    for name, layout in layouts.items():
        layout = dict(layout)
        distopt = layout.pop("distopt", False)
        par = ParallelConfig(**layout)
        with parallel_layout(par) as info:
            chunks = build_model_chunks(cfg, par)
            load_hf_weights(chunks, HFSource(hf_dir), cfg, par)
            ddp = wrap_ddp(chunks, use_distributed_optimizer=distopt)
            optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3), use_distributed_optimizer=distopt)
            per_rank = len(batch) // info.dp_size
            mine = batch[info.dp_rank * per_rank:(info.dp_rank + 1) * per_rank]
            results[name] = [train_step(ddp, optimizer, mine) for _ in range(STEPS)]
    return results


LAYOUTS_2 = {
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "dp2_distopt": dict(distopt=True),
    "pp2_vpp2": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
}
LAYOUTS_4 = {
    "tp2_pp2_sp_distopt": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True,
                               distopt=True),
    "tp2_dp2_sp_distopt": dict(tensor_model_parallel_size=2, sequence_parallel=True, distopt=True),
}


def test_every_layout_matches_single_process(tiny_hf_dir):
    reference = spawn(_run_layouts, 1, tiny_hf_dir, {"ref": {}}, timeout=300)[0]["ref"]
    assert all(torch.isfinite(torch.tensor([r.loss, r.grad_norm])).all() for r in reference)
    assert reference[0].loss != reference[1].loss, "the first step must change the model"
    runs = {**spawn(_run_layouts, 2, tiny_hf_dir, LAYOUTS_2, timeout=420)[0],
            **spawn(_run_layouts, 4, tiny_hf_dir, LAYOUTS_4, timeout=420)[0]}
    assert set(runs) == set(LAYOUTS_2) | set(LAYOUTS_4)
    failures = []
    for name, steps in runs.items():
        for step, (got, ref) in enumerate(zip(steps, reference)):
            for what in ("loss", "grad_norm"):
                d = rel_diff(getattr(got, what), getattr(ref, what))
                if d > TOLERANCE:
                    failures.append(f"{name} step {step} {what}: {getattr(got, what):.8f} vs "
                                    f"{getattr(ref, what):.8f} (rel {d:.2e})")
            assert got.supervised_tokens == ref.supervised_tokens
    assert not failures, "\n".join(failures)
