"""Our InternViT and the whole LongVITAForCausalLM against transformers' own InternVL code
holding the same weights (InternVLVisionModel, InternVLForConditionalGeneration)."""
import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, InternVLVisionModel

from megatron_vita.hf.configuration import InternVisionConfig
from megatron_vita.hf.tiny import randomize_
from megatron_vita.hf.vision import InternVisionModel


def internvl_vision_config(cfg: InternVisionConfig) -> InternVLVisionConfig:
    # use_mean_pooling=True makes InternVL's final norm an Identity: InternViT-300M has none.
    return InternVLVisionConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
        norm_type="layer_norm", attention_bias=True, use_qk_norm=False, use_mean_pooling=True,
        hidden_act="gelu", use_absolute_position_embeddings=True,
    )


def vision_to_internvl(sd: dict, prefix: str = "") -> dict:
    """Our released-name ViT state dict -> InternVLVisionModel names (qkv split in three)."""
    out = {}
    for key, value in sd.items():
        k = key[len(prefix):]
        if k == "embeddings.class_embedding":
            out["embeddings.cls_token"] = value
        elif k == "embeddings.position_embedding":
            out["embeddings.position_embeddings"] = value
        elif k.startswith("embeddings.patch_embedding."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = value
        else:
            _, _, i, rest = k.split(".", 3)  # encoder.layers.<i>.<rest>
            layer = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{layer}attention.{name}.{kind}"] = part
            else:
                rename = {"attn.proj.": "attention.projection_layer.", "norm1.": "layernorm_before.",
                          "norm2.": "layernorm_after.", "ls1": "lambda_1", "ls2": "lambda_2", "mlp.": "mlp."}
                src = next(s for s in rename if rest.startswith(s))
                out[layer + rename[src] + rest[len(src):]] = value
    return out


@pytest.fixture(scope="module")
def vision_pair():
    cfg = InternVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=56, patch_size=14, layer_norm_eps=1e-6)
    ours = InternVisionModel(cfg)
    randomize_(ours, seed=5)
    ref = InternVLVisionModel(internvl_vision_config(cfg))
    ref.load_state_dict(vision_to_internvl(ours.state_dict()), strict=True)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("size", [(56, 56), (84, 84), (56, 84)], ids=["native", "larger", "non_square"])
def test_vision_matches_internvl(vision_pair, size):
    """At the native size the stored positions are used; other sizes resize them bicubically."""
    ours, ref = vision_pair
    pixels = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a = ours(pixels).last_hidden_state
        b = ref(pixel_values=pixels).last_hidden_state
    assert a.shape == (3, 1 + (size[0] // 14) * (size[1] // 14), 32)
    assert (a - b).abs().max().item() <= 1e-5
    assert b.abs().max().item() > 0.1  # not a trivially small output


def test_vision_layer_scale_matters(vision_pair):
    """Guard on the comparison above: changing one ls2 entry changes the output."""
    ours, _ = vision_pair
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = ours(pixels).last_hidden_state.clone()
        layer = ours.encoder.layers[1]
        saved = layer.ls2.clone()
        layer.ls2[0] += 0.5
        after = ours(pixels).last_hidden_state
        layer.ls2.copy_(saved)
    assert (before - after).abs().max().item() > 1e-3


def internvl_from_long_vita(model) -> InternVLForConditionalGeneration:
    """InternVL holding the weights of a LongVITAForCausalLM: zero projector biases, and the
    names mapped (qkv split, ls -> lambda, vision_model -> vision_tower, model.* ->
    model.language_model.*, projector -> multi_modal_projector)."""
    c = model.config
    assert c.projector_hidden_size == c.hidden_size, "InternVL needs bottleneck == LLM width"
    text = dict(model_type="qwen2", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                rope_theta=c.rope_parameters["rope_theta"], tie_word_embeddings=False)
    cfg = InternVLConfig(vision_config=internvl_vision_config(c.visual).to_dict(), text_config=text,
                         image_token_id=c.special_token_ids["<IMG_CONTEXT>"], image_seq_length=c.num_image_token,
                         downsample_ratio=c.downsample_ratio, projector_hidden_act="gelu",
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    ref = InternVLForConditionalGeneration(cfg)
    sd = model.state_dict()
    new = {"model.vision_tower." + k: v for k, v in vision_to_internvl(
        {k: v for k, v in sd.items() if k.startswith("model.vision_model.")}, "model.vision_model.").items()}
    proj = "model.vision_projection."
    mmp = "model.multi_modal_projector."
    new[mmp + "layer_norm.weight"] = sd[proj + "pre_proj_layernorm.weight"]
    new[mmp + "layer_norm.bias"] = sd[proj + "pre_proj_layernorm.bias"]
    new[mmp + "linear_1.weight"] = sd[proj + "mlp.0.weight"]
    new[mmp + "linear_2.weight"] = sd[proj + "mlp.2.weight"]
    new[mmp + "linear_1.bias"] = torch.zeros(c.hidden_size)
    new[mmp + "linear_2.bias"] = torch.zeros(c.hidden_size)
    for k, v in sd.items():
        if k.startswith("model.") and not k.startswith(("model.vision_model.", proj)):
            new["model.language_model." + k[len("model."):]] = v
    new["lm_head.weight"] = sd["lm_head.weight"]
    ref.load_state_dict(new, strict=True)
    return ref.eval()


def test_whole_model_matches_internvl(tiny_model):
    """LongVITAForCausalLM == InternVLForConditionalGeneration with the same weights, on a
    batch of two rows (3 tiles in row 0, 1 in row 1, text around them).

    Differences bridged (see internvl_from_long_vita): InternVL's projector biases are set to
    zero (Long-VITA's projector has none); InternVL's bottleneck is the LLM width, Long-VITA's
    the ViT width, equal in the tiny preset (64); InternVL fills one image token id, so only
    <IMG_CONTEXT> is used here (Long-VITA also fills <VID_CONTEXT> and <PATCH_CONTEXT>).
    """
    c = tiny_model.config
    img = c.special_token_ids["<IMG_CONTEXT>"]
    n = c.num_image_token
    ids = torch.randint(0, c.vocab_size - 20, (2, 30), generator=torch.Generator().manual_seed(8))
    ids[0, 2:2 + n] = img
    ids[0, 8:8 + 2 * n] = img  # two tiles back to back
    ids[1, 20:20 + n] = img
    images = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(9))
    ref = internvl_from_long_vita(tiny_model)
    with torch.no_grad():
        ours = tiny_model(input_ids=ids, images=images).logits
        theirs = ref(input_ids=ids, pixel_values=images).logits
        text_only = tiny_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - text_only).abs().max().item() > 1e-2  # the images do reach the logits
