"""The megatron-core Long-VITA against transformers' own modules, at TP=1 (DP=2) and TP=2.

- language part vs transformers' Qwen2ForCausalLM holding the same weights;
- vision tower vs transformers' InternVLVisionModel holding the same weights (q/k/v are
  separate there and fused here, lambda_1/2 are ls1/ls2), at the native image size and at a
  size that needs position-embedding interpolation;
- the whole model vs this project's HF LongVITAForCausalLM on text, image+text and
  video+text batches (batch of 2: one sample with three tiles, one with none / two frames).
All in fp32 on real gloo process groups.
"""
import torch

from mv_testlib import checkpoint_weights_with, collate, multimodal_batch, qwen2_reference, randomize_params, spawn


def _internvl_vision(cfg):
    from transformers import InternVLVisionConfig, InternVLVisionModel

    v = cfg.vision
    vcfg = InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
        intermediate_size=v.ffn_hidden_size, image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
        layer_norm_eps=v.layernorm_epsilon, attention_bias=True, use_qk_norm=False, use_mean_pooling=True,
        use_absolute_position_embeddings=True, norm_type="layer_norm", hidden_act="gelu")
    model = InternVLVisionModel(vcfg).eval()
    randomize_params(model, seed=2)
    return model


def _internvl_to_long_vita_names(sd):
    """transformers' InternVL vision names -> the released Long-VITA HF names."""
    out = {
        "model.vision_model.embeddings.class_embedding": sd["embeddings.cls_token"],
        "model.vision_model.embeddings.position_embedding": sd["embeddings.position_embeddings"],
        "model.vision_model.embeddings.patch_embedding.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "model.vision_model.embeddings.patch_embedding.bias": sd["embeddings.patch_embeddings.projection.bias"],
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n_layers):
        src, dst = f"encoder.layer.{i}.", f"model.vision_model.encoder.layers.{i}."
        for wb in ("weight", "bias"):
            out[dst + f"attn.qkv.{wb}"] = torch.cat([sd[src + f"attention.{p}_proj.{wb}"] for p in "qkv"])
            out[dst + f"attn.proj.{wb}"] = sd[src + f"attention.projection_layer.{wb}"]
            out[dst + f"norm1.{wb}"] = sd[src + f"layernorm_before.{wb}"]
            out[dst + f"norm2.{wb}"] = sd[src + f"layernorm_after.{wb}"]
            out[dst + f"mlp.fc1.{wb}"] = sd[src + f"mlp.fc1.{wb}"]
            out[dst + f"mlp.fc2.{wb}"] = sd[src + f"mlp.fc2.{wb}"]
        out[dst + "ls1"] = sd[src + "lambda_1"]
        out[dst + "ls2"] = sd[src + "lambda_2"]
    return out


def _compare_rank(rank, world, hf_dir):
    from transformers import AutoModelForCausalLM

    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.pipeline import forward_only
    from megatron_vita.parallel.state import parallel_layout

    cfg = ModelConfig.from_hf_dir(hf_dir)
    ckpt = HFSource(hf_dir)
    qwen2, vit = qwen2_reference(cfg), _internvl_vision(cfg)
    source = checkpoint_weights_with(hf_dir, qwen2.state_dict(), _internvl_to_long_vita_names(vit.state_dict()))
    hf_long_vita = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report = {}
    for tp in (1, 2):
        par = ParallelConfig(tensor_model_parallel_size=tp)
        with parallel_layout(par):
            # 1) language part vs Qwen2ForCausalLM; 2) vision tower vs InternVLVisionModel
            model = build_model_chunks(cfg, par)[0]
            load_hf_weights([model], source, cfg, par)
            gen = torch.Generator().manual_seed(3)
            ids = torch.randint(0, cfg.tokens.bos_token_id, (2, 24), generator=gen)
            ours = forward_only([model], [{"tokens": ids}])[0]
            with torch.no_grad():
                ref = qwen2(input_ids=ids).logits
            report[f"tp{tp}_qwen2"] = (ours - ref).abs().max().item()
            for size in (cfg.vision.image_size, cfg.vision.image_size + 2 * cfg.vision.patch_size):
                px = torch.randn(3, 3, size, size, generator=gen)
                with torch.no_grad():
                    ours_v = model.vision_model(px)
                    ref_v = vit(pixel_values=px).last_hidden_state
                report[f"tp{tp}_vit{size}"] = (ours_v - ref_v).abs().max().item()
            # 3) whole model vs our HF class, both holding the checkpoint's weights
            load_hf_weights([model], ckpt, cfg, par)
            for kinds in (("image3", "text"), ("video2", "image1")):
                batch = collate(multimodal_batch(cfg, kinds, seq_len=40, seed=len(kinds[0])))
                ours = forward_only([model], [batch])[0]
                with torch.no_grad():
                    ref = hf_long_vita(input_ids=batch["tokens"], images=batch["pixel_values"]).logits
                report[f"tp{tp}_long_vita_{'+'.join(kinds)}"] = (ours - ref).abs().max().item()
    return report


def test_megatron_matches_transformers_modules(tiny_hf_dir):
    reports = spawn(_compare_rank, 2, tiny_hf_dir, timeout=420)
    for rank, report in enumerate(reports):
        assert len(report) == 10, report
        for key, diff in report.items():
            bound = 1e-4 if "qwen2" in key else 1e-5
            assert diff <= bound, f"rank {rank} {key}: max |diff| {diff:.3e} > {bound:g} ({report})"
