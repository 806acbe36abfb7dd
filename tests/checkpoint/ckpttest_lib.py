"""Helpers for the checkpoint tests: a TP8-capable tiny checkpoint, tensor loading, released layouts.

The released-layout writers here are written from the description in
shared/reference/longvita.md (names, QKV grouping, ViT per-head interleave, file layout), with
plain torch.save, independently of the converter they test.
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Dict

import torch

# A tiny model whose every width divides 8: 16 query heads in 8 KV groups (2 per group, like
# the released 40/8 = 5), a ViT with 8 heads, 4 LLM layers (PP2 x VPP2 = 1 layer per chunk).
WIDE = dict(
    vision=dict(hidden_size=64, num_layers=2, num_attention_heads=8, ffn_hidden_size=128, image_size=56,
                patch_size=14),
    projector=dict(ffn_hidden_size=64),
    language=dict(vocab_size=512, hidden_size=128, num_layers=4, num_attention_heads=16, num_query_groups=8,
                  ffn_hidden_size=256, max_position_embeddings=4096),
)


def wide_config():
    from megatron_vita.config.model import ModelConfig, TokenIds

    d = dict(WIDE, tokens=vars(TokenIds.at_end_of_vocab(512)), name="tiny-wide")
    return ModelConfig.from_dict(d)


def write_hf(out_dir: str, cfg, seed: int = 0) -> str:
    """A random HF checkpoint of `cfg` (the same recipe as create_tiny: randomized, sharded, fp32)."""
    from megatron_vita.hf.configuration import LongVITAConfig
    from megatron_vita.hf.modeling import LongVITAForCausalLM
    from megatron_vita.hf.tiny import generation_config_for, randomize_

    config = LongVITAConfig.from_model_config(cfg)
    torch.manual_seed(seed)
    model = LongVITAForCausalLM(config)
    randomize_(model, seed)
    model.generation_config = generation_config_for(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out_dir, max_shard_size=total // 2)
    return out_dir


def hf_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a HF directory, read by the safetensors library itself."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def layout(tp: int = 1, pp: int = 1, vpp=None, first=None, last=None, divisor: int = 1):
    """A Megatron layout (the converter's ParallelConfig) in the short form the tests use."""
    from megatron_vita.config.parallel import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          virtual_pipeline_model_parallel_size=vpp, num_layers_in_first_pipeline_stage=first,
                          num_layers_in_last_pipeline_stage=last, make_vocab_size_divisible_by=divisor)


def split_of(par):
    """(TP, PP, VPP, first-stage layers, last-stage layers) of a layout."""
    return (par.tp, par.pp, par.vpp, par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage)


def assert_same_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    diff = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:4]}"


# ---- released Megatron layouts, hand-written from longvita.md ------------------------------------

def _split(t: torch.Tensor, tp: int, dim: int):
    return list(t.chunk(tp, dim=dim))


def released_state_dicts(hf: Dict[str, torch.Tensor], cfg, tp: int, te_names: bool, vit_te_names=None):
    """Per TP rank, the LLM + ViT + projector state dict in the released MindSpeed (or TE) names.

    LLM QKV: per KV group [its q heads; k; v] x head_dim rows, groups split over TP ranks.
    ViT QKV: per head [q_h; k_h; v_h] (HF's fused qkv is [all Q; all K; all V]), heads split
    over TP. fc1: [gate_shard; up_shard]. Row-parallel weights split on dim 1. Dummy `unused`.
    TE names fuse the pre-norms into the next linear (`linear_qkv.layer_norm_weight`, ...);
    `vit_te_names` (default: te_names) picks the ViT's norm names separately.
    """
    lm, vit = cfg.language, cfg.vision
    heads, groups, d = lm.num_attention_heads, lm.num_query_groups, lm.hidden_size // lm.num_attention_heads
    ranks = [dict() for _ in range(tp)]

    def put(name, pieces):
        for r in range(tp):
            ranks[r][name] = pieces[r].clone()

    def same(name, t):
        put(name, [t] * tp)

    def norms(te):
        return (("self_attention.linear_qkv.layer_norm_{}", "mlp.linear_fc1.layer_norm_{}") if te
                else ("input_layernorm.{}", "pre_mlp_layernorm.{}"))

    norm_in, norm_mlp = norms(te_names)
    put("embedding.word_embeddings.weight", _split(hf["model.embed_tokens.weight"], tp, 0))
    for i in range(lm.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            q = hf[h + f"self_attn.q_proj.{kind}"].reshape(groups, heads // groups * d, *([-1] if kind == "weight" else []))
            k = hf[h + f"self_attn.k_proj.{kind}"].reshape(groups, d, *([-1] if kind == "weight" else []))
            v = hf[h + f"self_attn.v_proj.{kind}"].reshape(groups, d, *([-1] if kind == "weight" else []))
            per_group = torch.cat([q, k, v], dim=1)  # [groups, (q heads + 2) * d, ...]
            put(m + f"self_attention.linear_qkv.{kind}",
                [g.reshape(-1, *per_group.shape[2:]) for g in per_group.chunk(tp, dim=0)])
        put(m + "self_attention.linear_proj.weight", _split(hf[h + "self_attn.o_proj.weight"], tp, 1))
        gates = _split(hf[h + "mlp.gate_proj.weight"], tp, 0)
        ups = _split(hf[h + "mlp.up_proj.weight"], tp, 0)
        put(m + "mlp.linear_fc1.weight", [torch.cat([g, u]) for g, u in zip(gates, ups)])
        put(m + "mlp.linear_fc2.weight", _split(hf[h + "mlp.down_proj.weight"], tp, 1))
        same(m + norm_in.format("weight"), hf[h + "input_layernorm.weight"])
        same(m + norm_mlp.format("weight"), hf[h + "post_attention_layernorm.weight"])
    same("decoder.final_layernorm.weight", hf["model.norm.weight"])
    put("output_layer.weight", _split(hf["lm_head.weight"], tp, 0))
    same("unused", torch.zeros(lm.hidden_size, dtype=hf["model.norm.weight"].dtype))

    norm_in, norm_mlp = norms(te_names if vit_te_names is None else vit_te_names)
    e, vd = "model.vision_model.", vit.hidden_size // vit.num_attention_heads
    x = "external_feature_model."
    same(x + "vit.conv1.weight", hf[e + "embeddings.patch_embedding.weight"])
    same(x + "vit.conv1.bias", hf[e + "embeddings.patch_embedding.bias"])
    same(x + "vit.class_token", hf[e + "embeddings.class_embedding"])
    same(x + "vit.position_embeddings.weight", hf[e + "embeddings.position_embedding"][0])
    for i in range(vit.num_layers):
        h, m = f"{e}encoder.layers.{i}.", f"{x}vit.decoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = hf[h + f"attn.qkv.{kind}"]
            q, k, v = (t.reshape(vit.num_attention_heads, vd, *qkv.shape[1:]) for t in qkv.chunk(3))
            per_head = torch.stack([q, k, v], dim=1).reshape(-1, *qkv.shape[1:])  # rows h*3d.. = q_h, k_h, v_h
            put(m + f"self_attention.linear_qkv.{kind}", _split(per_head, tp, 0))
            same(m + norm_in.format(kind), hf[h + f"norm1.{kind}"])
            same(m + norm_mlp.format(kind), hf[h + f"norm2.{kind}"])
            put(m + f"mlp.linear_fc1.{kind}", _split(hf[h + f"mlp.fc1.{kind}"], tp, 0))
        put(m + "self_attention.linear_proj.weight", _split(hf[h + "attn.proj.weight"], tp, 1))
        same(m + "self_attention.linear_proj.bias", hf[h + "attn.proj.bias"])
        put(m + "mlp.linear_fc2.weight", _split(hf[h + "mlp.fc2.weight"], tp, 1))
        same(m + "mlp.linear_fc2.bias", hf[h + "mlp.fc2.bias"])
        same(m + "ls1", hf[h + "ls1"])
        same(m + "ls2", hf[h + "ls2"])
    same(x + "pre_proj_layernorm.weight", hf["model.vision_projection.pre_proj_layernorm.weight"])
    same(x + "pre_proj_layernorm.bias", hf["model.vision_projection.pre_proj_layernorm.bias"])
    put(x + "vision_projection.encoder.linear_fc1.weight", _split(hf["model.vision_projection.mlp.0.weight"], tp, 0))
    put(x + "vision_projection.encoder.linear_fc2.weight", _split(hf["model.vision_projection.mlp.2.weight"], tp, 1))
    return ranks


def write_released(root: str, ranks, iteration: int = 1) -> str:
    """`root/iter_XXXXXXX/mp_rank_TT/model_optim_rng.pt` (TP x PP1) + tracker, like the release."""
    it = os.path.join(root, f"iter_{iteration:07d}")
    for r, sd in enumerate(ranks):
        os.makedirs(os.path.join(it, f"mp_rank_{r:02d}"))
        args = argparse.Namespace(tensor_model_parallel_size=len(ranks), pipeline_model_parallel_size=1)
        torch.save({"model": sd, "checkpoint_version": 3.0, "iteration": iteration, "args": args},
                   os.path.join(it, f"mp_rank_{r:02d}", "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return root
