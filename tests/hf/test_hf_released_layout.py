"""A checkpoint in the released Long-VITA `*_HF` layout, written by hand (not by this project),
loads with plain `AutoModelForCausalLM.from_pretrained` after `import megatron_vita`, and its
language part computes exactly what transformers' own Qwen2ForCausalLM computes."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import megatron_vita  # noqa: F401  (the only thing needed to load model_type "long_vita")

# Sizes of the hand-made checkpoint: the real vocabulary (so the real token ids apply), a
# small LLM (hidden 48) and ViT (hidden 32, 56px tiles -> 4 tokens per tile). The projector
# bottleneck is the ViT width, unlike the LLM width, as in the release (1024 vs 5120).
VOCAB, HID, LAYERS, HEADS, KV, FFN = 152064, 48, 2, 4, 2, 96
VIT, VIT_LAYERS, VIT_HEADS, VIT_FFN, IMG, PATCH = 32, 2, 4, 64, 56, 14
IMG_CONTEXT = 151667  # <IMG_CONTEXT> on the Qwen2.5 tokenizer

RELEASED_CONFIG = {
    "architectures": ["LongVITAForCausalLM"],
    "model_type": "long_vita",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": HID,
    "initializer_range": 0.02,
    "intermediate_size": FFN,
    "max_position_embeddings": 1310720,
    "max_window_layers": 70,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB,
    "visual": {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": VIT,
        "image_size": IMG,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "intermediate_size": VIT_FFN,
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": VIT_HEADS,
        "num_channels": 3,
        "num_hidden_layers": VIT_LAYERS,
        "patch_size": PATCH,
        "qk_normalization": False,
        "qkv_bias": True,
        "use_flash_attn": True,
    },
}
WITH_AUTO_MAP = dict(RELEASED_CONFIG, auto_map={
    "AutoConfig": "configuration_long_vita.LongVITAConfig",
    "AutoModel": "modeling_long_vita.LongVITAModel",
    "AutoModelForCausalLM": "modeling_long_vita.LongVITAForCausalLM",
})


def _vision_and_projector_tensors(gen):
    def t(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    pre = "model.vision_model."
    n_pos = (IMG // PATCH) ** 2 + 1
    out = {
        pre + "embeddings.class_embedding": t(1, 1, VIT, std=0.5),
        pre + "embeddings.patch_embedding.weight": t(VIT, 3, PATCH, PATCH, std=(3 * PATCH * PATCH) ** -0.5),
        pre + "embeddings.patch_embedding.bias": t(VIT, std=0.1),
        pre + "embeddings.position_embedding": t(1, n_pos, VIT, std=0.5),
    }
    for i in range(VIT_LAYERS):
        layer = f"{pre}encoder.layers.{i}."
        out.update({
            layer + "norm1.weight": t(VIT, std=0.2, mean=1.0), layer + "norm1.bias": t(VIT, std=0.1),
            layer + "norm2.weight": t(VIT, std=0.2, mean=1.0), layer + "norm2.bias": t(VIT, std=0.1),
            layer + "attn.qkv.weight": t(3 * VIT, VIT, std=VIT ** -0.5), layer + "attn.qkv.bias": t(3 * VIT, std=0.1),
            layer + "attn.proj.weight": t(VIT, VIT, std=VIT ** -0.5), layer + "attn.proj.bias": t(VIT, std=0.1),
            layer + "mlp.fc1.weight": t(VIT_FFN, VIT, std=VIT ** -0.5), layer + "mlp.fc1.bias": t(VIT_FFN, std=0.1),
            layer + "mlp.fc2.weight": t(VIT, VIT_FFN, std=VIT_FFN ** -0.5), layer + "mlp.fc2.bias": t(VIT, std=0.1),
            layer + "ls1": t(VIT, std=0.2, mean=0.5), layer + "ls2": t(VIT, std=0.2, mean=0.5),
        })
    proj = "model.vision_projection."
    out.update({
        proj + "pre_proj_layernorm.weight": t(4 * VIT, std=0.2, mean=1.0),
        proj + "pre_proj_layernorm.bias": t(4 * VIT, std=0.1),
        proj + "mlp.0.weight": t(VIT, 4 * VIT, std=(4 * VIT) ** -0.5),
        proj + "mlp.2.weight": t(HID, VIT, std=VIT ** -0.5),
    })
    return out


def _qwen2_config(rope_theta=1e6):
    return Qwen2Config(vocab_size=VOCAB, hidden_size=HID, intermediate_size=FFN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=1e-6,
                       max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=rope_theta,
                       bos_token_id=151643, eos_token_id=151645)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(dir of the hand-made Long-VITA checkpoint, dir of the same LLM as a plain Qwen2 checkpoint)."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(_qwen2_config())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial scales so that a wrong tensor shows in the logits
        for name, p in qwen.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if name.endswith("norm.weight")
                        else torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else p.shape[1] ** -0.5))
    qwen_dir = root / "qwen2"
    qwen.save_pretrained(qwen_dir)

    tensors = {k: v.contiguous() for k, v in qwen.state_dict().items()}
    tensors.update(_vision_and_projector_tensors(gen))
    names = sorted(tensors)
    # Two shards + index, as the released checkpoints are stored.
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    vita_dir = root / "long_vita"
    vita_dir.mkdir()
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(vita_dir / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
             "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (vita_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(vita_dir), str(qwen_dir), tensors


def _write_config(path, cfg):
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


@pytest.mark.parametrize("cfg", [RELEASED_CONFIG, WITH_AUTO_MAP], ids=["plain", "auto_map"])
def test_released_layout_loads_and_matches_qwen2(released, cfg):
    vita_dir, qwen_dir, tensors = released
    _write_config(vita_dir, cfg)
    model, info = AutoModelForCausalLM.from_pretrained(vita_dir, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "LongVITAForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(model.state_dict()) == set(tensors)
    for key in ("model.vision_model.encoder.layers.1.ls2", "model.vision_projection.mlp.2.weight",
                "model.layers.1.self_attn.k_proj.bias", "lm_head.weight"):
        torch.testing.assert_close(model.state_dict()[key], tensors[key], rtol=0, atol=0)

    ids = torch.randint(0, 151643, (2, 24), generator=torch.Generator().manual_seed(2))
    qwen = Qwen2ForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        ref = qwen(input_ids=ids).logits
    assert (ours - ref).abs().max().item() <= 1e-5


def test_released_config_uses_rope_theta_1e6(released):
    """The trap: rope_theta must reach rope_parameters (what the rotary embedding reads)."""
    vita_dir, qwen_dir, _ = released
    _write_config(vita_dir, RELEASED_CONFIG)
    config = AutoConfig.from_pretrained(vita_dir)
    assert type(config).__name__ == "LongVITAConfig"
    assert config.rope_parameters["rope_theta"] == 1e6
    model = AutoModelForCausalLM.from_pretrained(vita_dir, dtype=torch.float32).eval()
    head_dim = HID // HEADS
    expected = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
    # The comparison above is sensitive to the base: a Qwen2 with base 10000 differs.
    ids = torch.arange(100, 140).unsqueeze(0)
    wrong = Qwen2ForCausalLM.from_pretrained(qwen_dir, config=_qwen2_config(1e4), dtype=torch.float32).eval()
    assert wrong.config.rope_parameters["rope_theta"] == 1e4
    with torch.no_grad():
        assert (model(input_ids=ids).logits - wrong(input_ids=ids).logits).abs().max().item() > 1e-3
    # Released configs carry no project keys: the Qwen2.5 special-token ids are the defaults.
    assert config.special_token_ids["<IMG_CONTEXT>"] == IMG_CONTEXT
    assert config.context_token_ids == (151667, 151670, 151673)
    assert config.projector_hidden_size == VIT and config.num_image_token == 4
    assert config.to_model_config().language.rope_theta == 1e6


def test_released_image_indices_argument(released):
    """Released callers pass `image_indices` [2, n_tiles, 256]-style; deriving them from the
    <IMG_CONTEXT> tokens gives the same result, and the images do change the output."""
    vita_dir, _, _ = released
    _write_config(vita_dir, RELEASED_CONFIG)
    model = AutoModelForCausalLM.from_pretrained(vita_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 151643, (1, 20), generator=torch.Generator().manual_seed(3))
    ids[0, 3:7] = IMG_CONTEXT
    ids[0, 10:14] = IMG_CONTEXT
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(4))
    indices = torch.tensor([[[0] * 4, [0] * 4], [list(range(3, 7)), list(range(10, 14))]])
    with torch.no_grad():
        given = model(input_ids=ids, images=images, image_indices=indices).logits
        derived = model(input_ids=ids, images=images).logits
        swapped = model(input_ids=ids, images=images.flip(0)).logits
        text = model(input_ids=ids).logits
    torch.testing.assert_close(given, derived, rtol=0, atol=0)
    assert not math.isclose((given - swapped).abs().max().item(), 0.0)
    assert (given - text)[0, 3:].abs().max().item() > 1e-3
    torch.testing.assert_close(given[:, :3], text[:, :3], rtol=1e-5, atol=1e-5)


def test_verify_passes_on_the_released_layout_at_tp2_pp2(released, tmp_path):
    """`megatron-vita verify` on the hand-made released checkpoint, with a real image and a real video."""
    import re
    import subprocess
    import sys

    from mv_testlib import write_mp4, write_png

    vita_dir, _, _ = released
    _write_config(vita_dir, RELEASED_CONFIG)
    image, video = str(tmp_path / "img.png"), str(tmp_path / "clip.mp4")
    write_png(image)
    write_mp4(video)
    proc = subprocess.run([sys.executable, "-m", "megatron_vita", "verify", "--hf", vita_dir, "--tp", "2", "--pp", "2",
                           "--image", image, "--video", video], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.match(r"^verify: cosine=([0-9.]+) max_abs=(\S+) top1=([0-9.]+)%$", last)
    assert m and float(m.group(1)) >= 0.9999 and float(m.group(3)) == 100.0, last
    assert f"from {image}" in proc.stdout and f"from {video}" in proc.stdout
