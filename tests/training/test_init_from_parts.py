"""Stage 1 from the separately released parts: a Qwen2 LLM dir and an InternViT dir.

The parts are cut from a tiny Long-VITA HF checkpoint (LLM tensors under Qwen2 names; ViT tensors
under InternViT-300M's own names, without the `model.vision_model.` prefix). After
`--init-llm/--init-vit`, the LLM and ViT equal a model initialised from the whole checkpoint,
while the projector keeps its fresh initialisation.
"""
import os

import torch
from safetensors.torch import save_file

from mv_testlib import spawn


def _split(hf_dir, out):
    from megatron_vita.checkpoint.hf_format import HFSource

    ckpt = HFSource(hf_dir)
    llm, vit = {}, {}
    for name in list(ckpt.weight_map):
        if name.startswith("model.vision_model."):
            vit[name[len("model.vision_model."):]] = ckpt.read(name)
        elif not name.startswith("model.vision_projection."):
            llm[name] = ckpt.read(name)
    for sub, tensors in (("llm", llm), ("vit", vit)):
        os.makedirs(os.path.join(out, sub))
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, sub, "model.safetensors"))
    return os.path.join(out, "llm"), os.path.join(out, "vit")


def _rank(rank, world, hf_dir, llm_dir, vit_dir):
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.config import TrainConfig, stage_defaults
    from megatron_vita.training.loop import setup_model_and_optimizer

    cfg_model = ModelConfig.from_hf_dir(hf_dir)
    out = {}
    for name, init in (("whole", dict(init_hf=hf_dir)), ("parts", dict(init_llm=llm_dir, init_vit=vit_dir))):
        cfg = TrainConfig.from_flags(train_iters=2, **init, **stage_defaults(1))
        with parallel_layout(ParallelConfig(tensor_model_parallel_size=2)):
            ddp, _, _ = setup_model_and_optimizer(cfg, cfg_model, ParallelConfig(tensor_model_parallel_size=2))
            out[name] = {n: p.detach().clone() for n, p in ddp[0].module.named_parameters()}
    return {comp: all(torch.equal(out["whole"][n], out["parts"][n]) for n in out["whole"] if n.startswith(comp))
            for comp in ("vision_model", "vision_projection", "language_model")}


def test_stage1_from_llm_and_vit_parts(tiny_hf_dir, tmp_path):
    llm_dir, vit_dir = _split(tiny_hf_dir, str(tmp_path))
    for same in spawn(_rank, 2, tiny_hf_dir, llm_dir, vit_dir, timeout=300):
        assert same["vision_model"] and same["language_model"]
        assert not same["vision_projection"], "the projector must start fresh, not from the checkpoint"
