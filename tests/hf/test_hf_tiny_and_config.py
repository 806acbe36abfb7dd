"""create_tiny / `megatron-vita create-tiny`, LongVITAConfig <-> ModelConfig, Auto registration,
and the context-token convention (`context_token_indices`)."""
import ast
import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import megatron_vita
from megatron_vita.cli import main as cli_main
from megatron_vita.config.model import ModelConfig
from megatron_vita.hf import register_auto_classes
from megatron_vita.platform import ENV_VAR
from megatron_vita.hf.configuration import LongVITAConfig
from megatron_vita.hf.modeling import LongVITAForCausalLM, LongVITAModel
from megatron_vita.models.common.visual_tokens import context_token_indices


def _same_model_config(a: ModelConfig, b: ModelConfig) -> bool:
    return dataclasses.replace(a, name="x") == dataclasses.replace(b, name="x")


# ---- create_tiny --------------------------------------------------------------------------
def test_create_tiny_layout(tiny_dir, tiny_model):
    files = sorted(os.listdir(tiny_dir))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and all(f == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                    for i, f in enumerate(shards))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(files)
    with open(os.path.join(tiny_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map.values()) == set(shards)
    stored = {}
    for shard in shards:
        with safe_open(os.path.join(tiny_dir, shard), "pt") as f:
            for key in f.keys():
                stored[key] = shard
    assert stored == weight_map  # every indexed key is in its shard, and nothing else is
    for key in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.bias",
                "model.layers.0.mlp.gate_proj.weight", "model.layers.2.post_attention_layernorm.weight",
                "model.norm.weight", "lm_head.weight", "model.vision_model.embeddings.class_embedding",
                "model.vision_model.embeddings.position_embedding",
                "model.vision_model.encoder.layers.1.attn.qkv.weight", "model.vision_model.encoder.layers.0.ls1",
                "model.vision_projection.pre_proj_layernorm.bias", "model.vision_projection.mlp.0.weight",
                "model.vision_projection.mlp.2.weight"):
        assert key in weight_map, key
    assert set(weight_map) == set(tiny_model.state_dict())
    assert not any(k.endswith(("mlp.0.bias", "mlp.2.bias", "o_proj.bias")) for k in weight_map)
    sd = tiny_model.state_dict()
    assert sd["model.vision_model.encoder.layers.1.attn.qkv.weight"].shape == (192, 64)
    assert sd["model.vision_model.embeddings.position_embedding"].shape == (1, 17, 64)
    # tiny preset: ViT width 64 -> pixel shuffle 4 x 64 = 256 -> projector width 128 -> LLM width 128
    assert sd["model.vision_projection.mlp.0.weight"].shape == (128, 256)
    assert sd["model.vision_projection.mlp.2.weight"].shape == (128, 128)
    # Non-degenerate: layer scales and norms are not constants, biases are not zero.
    for key in ("model.vision_model.encoder.layers.0.ls1", "model.vision_model.encoder.layers.1.norm2.weight",
                "model.norm.weight", "model.vision_projection.pre_proj_layernorm.weight"):
        assert sd[key].std().item() > 0.05, key
    assert sd["model.layers.0.self_attn.v_proj.bias"].abs().min().item() > 0


def test_create_tiny_configs(tiny_dir, tiny_model):
    with open(os.path.join(tiny_dir, "generation_config.json")) as f:
        gen = json.load(f)
    tiny = ModelConfig.from_name("tiny")
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"]) == (0.7, 0.8, 20, 1.05)
    assert gen["eos_token_id"] == [tiny.tokens.eos_token_id, tiny.tokens.bos_token_id]
    with open(os.path.join(tiny_dir, "config.json")) as f:
        raw = json.load(f)
    assert raw["model_type"] == "long_vita" and raw["architectures"] == ["LongVITAForCausalLM"]
    assert raw["visual"]["hidden_size"] == 64 and raw["rope_theta"] == 1e6
    assert raw["special_token_ids"]["<IMG_CONTEXT>"] == tiny.tokens.img_context
    assert _same_model_config(ModelConfig.from_hf_dir(tiny_dir), tiny)
    assert _same_model_config(tiny_model.config.to_model_config(), tiny)
    assert tiny_model.dtype == torch.float32


def test_create_tiny_cli(tmp_path, capsys, monkeypatch):
    # The CLI exports the chosen backend for child processes; keep that out of other tests.
    monkeypatch.setenv(ENV_VAR, "cpu")
    out = tmp_path / "ckpt"
    assert cli_main(["create-tiny", str(out), "--dtype", "bf16", "--seed", "3"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    # A non-empty directory is refused without --force, and rewritten with it.
    assert cli_main(["create-tiny", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli_main(["create-tiny", str(out), "--force", "--seed", "4"]) == 0
    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert again.dtype == torch.float32
    assert not torch.equal(again.lm_head.weight, model.lm_head.weight.float())


# ---- configuration ------------------------------------------------------------------------
def test_default_config_is_long_vita_14b():
    c = LongVITAConfig()
    assert _same_model_config(c.to_model_config(), ModelConfig.from_name("long-vita-14b"))
    assert c.rope_parameters["rope_theta"] == 1e6 and c.num_image_token == 256
    assert c.context_token_ids == (151667, 151670, 151673)


def test_config_round_trip_through_model_config(tmp_path):
    mc = ModelConfig.from_name("tiny")
    c = LongVITAConfig.from_model_config(mc)
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LongVITAConfig)
    assert loaded.rope_parameters["rope_theta"] == 1e6
    assert _same_model_config(loaded.to_model_config(), mc)
    assert loaded.visual.hidden_size == mc.vision.hidden_size
    assert loaded.special_token_ids == mc.tokens.special


def test_config_without_rope_gets_long_vita_base(tmp_path):
    d = ModelConfig.from_name("tiny").to_hf_dict()
    del d["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 1e6


def test_released_visual_variants():
    c = LongVITAConfig(visual={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64, "image_size": [56, 56], "patch_size": [14, 14],
                               "use_flash_attn": True, "drop_path_rate": 0.1})
    assert (c.visual.image_size, c.visual.patch_size, c.projector_hidden_size) == (56, 14, 32)
    with pytest.raises(ValueError, match="qk_normalization"):
        LongVITAConfig(visual={"qk_normalization": True})
    with pytest.raises(ValueError, match="square"):
        LongVITAConfig(visual={"image_size": [448, 224]})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        LongVITAConfig(tie_word_embeddings=True)


def test_register_auto_classes_is_idempotent():
    register_auto_classes()
    register_auto_classes()
    d = ModelConfig.from_name("tiny").to_hf_dict()
    c = AutoConfig.for_model(d.pop("model_type"), **d)
    assert isinstance(c, LongVITAConfig)
    assert type(AutoModel.from_config(c)) is LongVITAModel
    assert type(AutoModelForCausalLM.from_config(c)) is LongVITAForCausalLM


# ---- context_token_indices ----------------------------------------------------------------
def test_context_token_indices_order_and_batch():
    ctx = (7, 8, 9)  # three context ids, mixed freely
    ids = torch.tensor([[1, 7, 7, 2, 9, 9, 3],
                        [8, 8, 4, 4, 7, 7, 5]])
    idx = context_token_indices(ids, ctx, num_image_token=2)
    assert idx.dtype == torch.long and idx.shape == (2, 4, 2)
    assert idx[0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert idx[1].tolist() == [[1, 2], [4, 5], [0, 1], [4, 5]]
    same = context_token_indices(ids, ctx, num_image_token=2, n_tiles=4)
    assert torch.equal(idx, same)
    assert context_token_indices(torch.tensor([[1, 2, 3]]), ctx, 2).shape == (2, 0, 2)


def test_context_token_indices_count_errors():
    ids = torch.tensor([[1, 7, 7, 7, 2]])
    with pytest.raises(ValueError, match="3 visual context tokens.*multiple of 2"):
        context_token_indices(ids, (7,), num_image_token=2)
    with pytest.raises(ValueError, match=r"3 visual context tokens.*2 tiles x 2 = 4"):
        context_token_indices(ids, (7,), num_image_token=2, n_tiles=2)
    with pytest.raises(ValueError, match="batch, seq"):
        context_token_indices(torch.tensor([7, 7]), (7,), num_image_token=2)


def _imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_visual_token_convention_has_one_home():
    # The megatron model reads the convention from a torch-only module, never from the HF classes,
    # and that module (imported by the HF classes) pulls in neither megatron-core nor transformers.
    package = os.path.dirname(os.path.abspath(megatron_vita.__file__))
    for root, _, files in os.walk(os.path.join(package, "models")):
        for name in files:
            if name.endswith(".py"):
                hf = {m for m in _imported_modules(os.path.join(root, name)) if m.startswith("megatron_vita.hf")}
                assert not hf, (os.path.join(root, name), hf)
    shared = _imported_modules(os.path.join(package, "models", "common", "visual_tokens.py"))
    assert shared <= {"__future__", "typing", "torch"}, shared


def test_forward_rejects_mismatched_tiles(tiny_model):
    c = tiny_model.config
    ids = torch.full((1, 12), 3)
    ids[0, 2:2 + c.num_image_token] = c.special_token_ids["<VID_CONTEXT>"]
    with pytest.raises(ValueError, match="2 tiles x 4 = 8"):
        tiny_model(input_ids=ids, images=torch.zeros(2, 3, 56, 56))
    with pytest.raises(ValueError, match="image_indices has shape"):
        tiny_model(input_ids=ids, images=torch.zeros(1, 3, 56, 56), image_indices=torch.zeros(2, 1, 3).long())
