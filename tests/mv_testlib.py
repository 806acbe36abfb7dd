"""Helpers shared by the megatron-side tests: tiny multimodal batches and spawned gloo ranks.

Rank functions passed to `spawn` must live at module level in an importable module (the
spawned interpreter imports them by name); this file and the test modules qualify because
pytest puts their directories on sys.path, which spawned children inherit.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import torch

IGNORE = -100


def spawn(fn, world: int, *args, timeout: float = 300):
    """Run fn(rank, world, *args) on `world` CPU ranks over gloo; results by rank."""
    from megatron_vita.platform import spawn as platform_spawn

    return platform_spawn(fn, world, *args, timeout=timeout, backend="cpu")


def text_ids(cfg, n: int, gen: torch.Generator) -> List[int]:
    high = min([cfg.tokens.bos_token_id, cfg.tokens.im_start_token_id, *cfg.tokens.special.values()])
    return torch.randint(0, high, (n,), generator=gen).tolist()


def sample(cfg, kind: str, seq_len: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """One sequence of `seq_len` tokens: text, or text around an image (1 or 3 tiles) or video frames.

    Labels are pre-shifted (labels[t] = tokens[t+1]) on a supervised tail, -100 elsewhere.
    """
    from megatron_vita.data.template import image_token_ids, video_token_ids

    T, size = cfg.num_image_token, cfg.vision.image_size
    if kind == "text":
        media, n_tiles = [], 0
    elif kind == "image1":
        media, n_tiles = image_token_ids(1, (1, 1), cfg.tokens, T, []), 1
    elif kind == "image3":
        media, n_tiles = image_token_ids(3, (1, 2), cfg.tokens, T, text_ids(cfg, 1, gen)), 3
    elif kind == "video2":
        media, n_tiles = video_token_ids(2, cfg.tokens, T), 2
    else:
        raise ValueError(kind)
    prefix = text_ids(cfg, 3, gen)
    rest = seq_len - len(prefix) - len(media)
    assert rest > 4, "sequence too short for its media"
    tokens = torch.tensor(prefix + media + text_ids(cfg, rest, gen))
    labels = torch.full_like(tokens, IGNORE)
    start = len(prefix) + len(media)
    labels[start:-1] = tokens[start + 1:]
    return {
        "tokens": tokens[None],
        "labels": labels[None],
        "loss_mask": (labels != IGNORE).float()[None],
        "pixel_values": torch.randn(n_tiles, 3, size, size, generator=gen),
    }


def multimodal_batch(cfg, kinds=("image1", "image3", "text", "video2"), seq_len: int = 32,
                     seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """Micro-batches of size 1, one per kind."""
    gen = torch.Generator().manual_seed(seed)
    return [sample(cfg, k, seq_len, gen) for k in kinds]


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Samples of equal length -> one batch (tiles concatenated in row-major token order)."""
    return {
        "tokens": torch.cat([s["tokens"] for s in samples]),
        "labels": torch.cat([s["labels"] for s in samples]),
        "loss_mask": torch.cat([s["loss_mask"] for s in samples]),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
    }


def tiny_checkpoint(path: str, seed: int = 0) -> str:
    """A tiny random Long-VITA HF checkpoint at `path` (created once, reused)."""
    from megatron_vita.hf.tiny import create_tiny

    if not os.path.isfile(os.path.join(path, "config.json")):
        create_tiny(path, preset="tiny", seed=seed)
    return path


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def write_png(path):
    """A real PNG: a yellow square on blue, 150x90 (a 2-tile grid at 56px)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (150, 90), (20, 40, 160))
    ImageDraw.Draw(img).rectangle([30, 20, 80, 70], fill=(230, 200, 20))
    img.save(path)


def write_mp4(path, frames=12, fps=4):
    """A real H.264 MP4 (PyAV): a green bar moving right over a reddening background."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            a = np.zeros((48, 64, 3), dtype=np.uint8)
            a[..., 0] = 20 * i
            a[10:30, 4 * i:4 * i + 12, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def randomize_params(module: torch.nn.Module, seed: int) -> None:
    """Non-degenerate values everywhere (biases, norms, layer scales), so mapping bugs show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or "lambda" in name or name.endswith(("ls1", "ls2"))):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)


def qwen2_reference(cfg, seed: int = 1):
    """transformers' own Qwen2ForCausalLM with the shapes of cfg.language and random weights (fp32, eval)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = cfg.language
    qcfg = Qwen2Config(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
                       num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
                       num_key_value_heads=lm.num_query_groups, rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_norm_eps,
                       max_position_embeddings=lm.max_position_embeddings, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(qcfg).eval()
    randomize_params(model, seed)
    return model


def checkpoint_weights_with(hf_dir: str, *overrides: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every tensor of the HF checkpoint at hf_dir by name, then replaced by the `overrides` dicts.

    With a qwen2_reference state dict as override, the LLM part of a megatron model loaded from
    the result (through the project's mapping, `load_hf_weights`) holds that Qwen2's weights.
    """
    from megatron_vita.checkpoint.hf_format import HFSource

    ckpt = HFSource(hf_dir)
    weights = {name: ckpt.read(name) for name in list(ckpt.weight_map)}
    for extra in overrides:
        weights.update(extra)
    return weights
