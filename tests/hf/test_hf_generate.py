"""generate() with images, video frames and text only, against a plain argmax loop of full
forwards without a KV cache; labels -> loss; gradients reach the vision side."""
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from megatron_vita.models.common.visual_tokens import context_token_indices

NEW_TOKENS = 6


def _greedy_config(model) -> GenerationConfig:
    # The checkpoint's own generation_config samples with a repetition penalty; greedy here.
    c = model.config
    return GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0,
                            eos_token_id=[c.eos_token_id, c.bos_token_id], pad_token_id=c.pad_token_id)


def _argmax_loop(model, ids, images):
    """Reference: every step re-runs the whole sequence (with the images), no cache. The
    feature positions come from the prompt (a random model may emit context-token ids)."""
    stops = {model.config.eos_token_id, model.config.bos_token_id}
    indices = None
    if images is not None:
        indices = context_token_indices(ids, model.config.context_token_ids, model.config.num_image_token)
    seq = ids
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=seq, images=images, image_indices=indices, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if nxt.item() in stops:
                break
    return seq


def _text(model, n, seed):
    # Ordinary tokens only (the last 20 ids of the tiny vocabulary are the special ones).
    return torch.randint(0, model.config.vocab_size - 20, (n,), generator=torch.Generator().manual_seed(seed))


def _image_prompt(model):
    """<img> thumbnail </img> \n <patch> tile </patch> <patch> tile </patch> + text: 3 tiles."""
    s = model.config.special_token_ids
    n = model.config.num_image_token
    parts = [_text(model, 5, 1), torch.tensor([s["<img>"]] + [s["<IMG_CONTEXT>"]] * n + [s["</img>"]])]
    for _ in range(2):
        parts.append(torch.tensor([s["<patch>"]] + [s["<PATCH_CONTEXT>"]] * n + [s["</patch>"]]))
    parts.append(_text(model, 7, 2))
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    return torch.cat(parts).unsqueeze(0), images


def _video_prompt(model, frames=4):
    s = model.config.special_token_ids
    n = model.config.num_image_token
    parts = [_text(model, 4, 4)]
    parts += [torch.tensor([s["<vid>"]] + [s["<VID_CONTEXT>"]] * n + [s["</vid>"]]) for _ in range(frames)]
    parts.append(_text(model, 6, 5))
    images = torch.randn(frames, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    return torch.cat(parts).unsqueeze(0), images


def _check_generate(model, ids, images):
    with torch.no_grad():
        out = model.generate(input_ids=ids, images=images, generation_config=_greedy_config(model))
    ref = _argmax_loop(model, ids, images)
    assert out.shape[1] > ids.shape[1]
    assert torch.equal(out, ref), (out, ref)
    return out


def test_generate_image_matches_argmax_loop(tiny_model):
    ids, images = _image_prompt(tiny_model)
    out = _check_generate(tiny_model, ids, images)
    # Without a KV cache every step gets the images again (at the prompt's positions).
    with torch.no_grad():
        no_cache = tiny_model.generate(input_ids=ids, images=images, use_cache=False,
                                       generation_config=_greedy_config(tiny_model))
    assert torch.equal(no_cache, out)
    # The images steer the continuation: other pixels give other logits at the prompt end.
    with torch.no_grad():
        a = tiny_model(input_ids=ids, images=images).logits[:, -1]
        b = tiny_model(input_ids=ids, images=torch.randn_like(images)).logits[:, -1]
    assert (a - b).abs().max().item() > 1e-2
    assert out.shape[0] == 1


def test_generate_video_matches_argmax_loop(tiny_model):
    ids, frames = _video_prompt(tiny_model)
    _check_generate(tiny_model, ids, frames)


def test_generate_text_only(tiny_model):
    ids = _text(tiny_model, 9, 7).unsqueeze(0)
    _check_generate(tiny_model, ids, None)
    # The checkpoint's own (sampling) generation config also runs.
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = tiny_model.generate(input_ids=ids, max_new_tokens=3)
    assert sampled.shape[1] <= ids.shape[1] + 3 and torch.equal(sampled[:, : ids.shape[1]], ids)


def test_labels_loss_and_gradients_reach_vision(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).train()
    ids, images = _image_prompt(model)
    labels = ids.clone()
    labels[:, :-5] = -100
    out = model(input_ids=ids, images=images, labels=labels)
    expected = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name in ("model.vision_projection.mlp.0.weight", "model.vision_model.encoder.layers.0.ls1",
                 "model.vision_model.embeddings.patch_embedding.weight", "model.embed_tokens.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum().item() > 0, name


def test_released_past_key_values_argument(tiny_model):
    """Incremental decoding with the released argument name `past_key_values` equals one
    full forward (images at prefill only)."""
    ids, images = _image_prompt(tiny_model)
    split = ids.shape[1] - 4
    with torch.no_grad():
        full = tiny_model(input_ids=ids, images=images).logits
        first = tiny_model(input_ids=ids[:, :split], images=images, use_cache=True)
        second = tiny_model(input_ids=ids[:, split:], past_key_values=first.cache, use_cache=True)
    assert first.cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, rtol=1e-5, atol=1e-5)
