"""Per-stage freezing and learning rates, through the training stack's own setup.

After Adam steps on image/video/text batches: frozen modules are unchanged bit for bit and the
trained ones moved (stage 1: projector only; stage 2: everything; stage 3: LLM + projector).
Stage 2's ViT learning rates are lr * 0.1 * 0.9^(L+1-layer) (embeddings count as layer 0),
read back from the optimizer's parameter groups after the scheduler stepped.
"""
import torch

from mv_testlib import multimodal_batch, spawn

COMPONENTS = ("vision_model", "vision_projection", "language_model")


def _snapshot(chunk):
    return {n: p.detach().clone() for n, p in chunk.named_parameters()}


def _rank(rank, world, hf_dir):
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.config import TrainConfig, stage_defaults
    from megatron_vita.training.engine import train_step
    from megatron_vita.training.loop import setup_model_and_optimizer

    model_config = ModelConfig.from_hf_dir(hf_dir)
    batch = multimodal_batch(model_config, seq_len=32)
    out = {}
    for stage in (1, 2, 3):
        cfg = TrainConfig.from_flags(init_hf=hf_dir, train_iters=10, lr_warmup_fraction=0.0, **stage_defaults(stage))
        par = ParallelConfig()
        with parallel_layout(par):
            ddp, optimizer, scheduler = setup_model_and_optimizer(cfg, model_config, par)
            chunk = ddp[0].module
            before = _snapshot(chunk)
            for _ in range(2):
                train_step(ddp, optimizer, batch)
                scheduler.step(increment=1)
            after = _snapshot(chunk)
            moved = {c: any(not torch.equal(before[n], after[n]) for n in before if n.startswith(c))
                     for c in COMPONENTS}
            unchanged = {c: all(torch.equal(before[n], after[n]) for n in before if n.startswith(c))
                         for c in COMPONENTS}
            lr_of = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    lr_of[id(p)] = group["lr"]
            names = {id(p): n for n, p in chunk.named_parameters()}
            vit_lrs = {names[i]: lr for i, lr in lr_of.items() if names.get(i, "").startswith("vision_model.")}
            other = {lr for i, lr in lr_of.items() if not names.get(i, "").startswith("vision_model.")}
            out[stage] = dict(moved=moved, unchanged=unchanged, vit_lrs=vit_lrs, other_lrs=sorted(other),
                              sched_lr=scheduler.get_lr(optimizer.param_groups[0]))
    return out


def test_stage_freezing_and_vit_layer_decay(tiny_hf_dir):
    from megatron_vita.config import ModelConfig

    res = spawn(_rank, 1, tiny_hf_dir, timeout=300)[0]
    s1, s2, s3 = res[1], res[2], res[3]
    assert s1["moved"]["vision_projection"] and s1["unchanged"]["vision_model"] and s1["unchanged"]["language_model"]
    assert all(s2["moved"].values())
    assert s3["unchanged"]["vision_model"] and s3["moved"]["vision_projection"] and s3["moved"]["language_model"]
    assert s1["vit_lrs"] == {} and s3["vit_lrs"] == {}  # frozen: not in the optimizer at all

    L = ModelConfig.from_hf_dir(tiny_hf_dir).vision.num_layers
    base = s2["sched_lr"]
    assert s2["other_lrs"] == [base]  # projector and LLM at the stage's LR
    assert len(s2["vit_lrs"]) > 10
    for name, lr in s2["vit_lrs"].items():
        layer = int(name.split(".")[3]) + 1 if name.startswith("vision_model.decoder.layers.") else 0
        expected = base * 0.1 * 0.9 ** (L + 1 - layer)
        assert abs(lr - expected) <= 1e-12 * expected, (name, lr, expected)
