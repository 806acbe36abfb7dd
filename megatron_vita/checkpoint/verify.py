"""`megatron-vita verify`: the same inputs through the HF model and the megatron-core model.

The HF reference runs in this process with transformers (LongVITAForCausalLM). The megatron
side runs at the requested layout (TP/PP/VPP/SP) on real process groups: under torchrun it uses
the launched ranks, otherwise it spawns TP*PP local ranks itself. Inputs: a text sequence, an
image (tiled exactly like training data) with text around it, and video frames with text.
Logits are compared per position; the last line printed is

    verify: cosine=<min cosine> max_abs=<max |diff|> top1=<agreement %>

and the exit status is 1 when, in fp32, cosine < 0.9999 or top-1 agreement < 100%.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

COSINE_MIN, TOP1_MIN = 0.9999, 100.0
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class VerifyInput:
    name: str
    input_ids: "torch.Tensor"  # [1, s]
    pixel_values: Optional["torch.Tensor"]  # [n, 3, H, W] or None
    media: str = ""


def _text_ids(cfg, n: int, rng: np.random.Generator) -> List[int]:
    """Ordinary (non-special) token ids: below the first special/control id of the config."""
    reserved = {cfg.tokens.bos_token_id, cfg.tokens.eos_token_id, cfg.tokens.pad_token_id,
                cfg.tokens.im_start_token_id, *cfg.tokens.special.values()}
    high = min(min(reserved), cfg.language.vocab_size)
    return rng.integers(0, high, size=n).tolist()


def _synthetic_image(size: int):
    """A non-square picture with structure, so that tiling gives several tiles."""
    from PIL import Image, ImageDraw

    w, h = int(size * 2.6), int(size * 1.3)
    img = Image.new("RGB", (w, h), (30, 60, 90))
    draw = ImageDraw.Draw(img)
    for k in range(8):
        x0, y0 = (k * 37) % w, (k * 53) % h
        draw.ellipse([x0, y0, x0 + size // 2, y0 + size // 3], fill=(40 * k % 255, 200 - 20 * k, 90 + 15 * k))
    return img


def _synthetic_video(size: int, frames: int):
    """Frames of a square moving across a gradient, normalised like real video frames."""
    from PIL import Image

    from megatron_vita.data.video import frames_to_tiles

    out = []
    for t in range(frames):
        a = np.zeros((size, size, 3), dtype=np.uint8)
        a[..., 2] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
        x = (t * size // max(frames, 1)) % (size - size // 4)
        a[size // 3:size // 3 + size // 4, x:x + size // 4, 0] = 255
        out.append(np.asarray(Image.fromarray(a)))
    return frames_to_tiles(out, size)


def build_inputs(cfg, image: Optional[str] = None, video: Optional[str] = None, seed: int = 0,
                 max_tiles: int = 12, max_frames: int = 8) -> List[VerifyInput]:
    """Text, image+text and video+text inputs in the Long-VITA token layout."""
    import torch

    from megatron_vita.data.image import load_image_tiles
    from megatron_vita.data.template import image_token_ids, video_token_ids
    from megatron_vita.data.video import load_video_frames

    rng = np.random.default_rng(seed)
    T, size = cfg.num_image_token, cfg.vision.image_size
    newline = _text_ids(cfg, 1, rng)
    inputs = [VerifyInput("text", torch.tensor([_text_ids(cfg, 48, rng)]), None)]

    tiles, grid = load_image_tiles(image if image else _synthetic_image(size), size, max_num=max_tiles)
    ids = _text_ids(cfg, 8, rng) + image_token_ids(tiles.shape[0], grid, cfg.tokens, T, newline) + _text_ids(cfg, 8, rng)
    inputs.append(VerifyInput("image+text", torch.tensor([ids]), tiles,
                              f"{tiles.shape[0]} tiles (grid {grid[0]}x{grid[1]}) from {image or 'a generated image'}"))

    if video:
        frames, _ = load_video_frames(video, size, max_num_frames=max_frames)
    else:
        frames = _synthetic_video(size, min(max_frames, 4))
    ids = _text_ids(cfg, 6, rng) + video_token_ids(frames.shape[0], cfg.tokens, T) + _text_ids(cfg, 6, rng)
    inputs.append(VerifyInput("video+text", torch.tensor([ids]), frames,
                              f"{frames.shape[0]} frames from {video or 'a generated video'}"))
    return inputs


def hf_logits(hf_dir: str, inputs: List[VerifyInput], dtype: str = "fp32") -> List["torch.Tensor"]:
    import torch
    from transformers import AutoModelForCausalLM

    import megatron_vita  # noqa: F401  (registers the Long-VITA Auto classes)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, DTYPES[dtype])).eval()
    out = []
    with torch.no_grad():
        for inp in inputs:
            images = None if inp.pixel_values is None else inp.pixel_values.to(model.dtype)
            out.append(model(input_ids=inp.input_ids, images=images).logits.float())
    return out


def megatron_logits_rank(rank: int, world: int, hf_dir: str, layout: Dict, inputs: List[VerifyInput],
                         dtype: str) -> Optional[List["torch.Tensor"]]:
    """Runs on every rank: build the layout, load HF weights, forward each input through the pipeline."""
    import torch

    from megatron_vita.checkpoint.hf_io import HFCheckpoint
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.pipeline import forward_only
    from megatron_vita.parallel.state import destroy_parallel, initialize_parallel

    cfg = ModelConfig.from_hf_dir(hf_dir)
    par = ParallelConfig(**layout).validate(cfg, world)
    info = initialize_parallel(par)
    try:
        chunks = build_model_chunks(cfg, par, BuildOptions(params_dtype=getattr(torch, DTYPES[dtype])))
        load_hf_weights(chunks, HFCheckpoint(hf_dir), cfg, par)
        results = []
        for inp in inputs:
            logits = forward_only(chunks, [{"tokens": inp.input_ids, "pixel_values": inp.pixel_values}])
            results.append(None if logits is None else logits[0][..., :cfg.language.vocab_size].float())
        keep = info.tp_rank == 0 and info.dp_rank == 0 and results[0] is not None
        return results if keep else None
    finally:
        destroy_parallel()


def compare(reference: "torch.Tensor", candidate: "torch.Tensor") -> Dict[str, float]:
    import torch

    a, b = reference.reshape(-1, reference.shape[-1]).double(), candidate.reshape(-1, candidate.shape[-1]).double()
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: HF {tuple(reference.shape)} vs megatron {tuple(candidate.shape)}")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "cosine": cos.min().item(),
        "max_abs": (a - b).abs().max().item(),
        "top1": 100.0 * (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        "positions": a.shape[0],
    }


def verify(hf_dir: str, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, sequence_parallel: bool = False,
           image: Optional[str] = None, video: Optional[str] = None, dtype: str = "fp32", seed: int = 0,
           max_tiles: int = 12, max_frames: int = 8, timeout: float = 900, backend: Optional[str] = None,
           log=print) -> Dict[str, float]:
    """Compare HF and megatron logits; returns the summary (min cosine, max |diff|, top-1 %)."""
    from megatron_vita import platform
    from megatron_vita.config import ModelConfig, ParallelConfig

    cfg = ModelConfig.from_hf_dir(hf_dir)
    layout = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel)
    ParallelConfig(**layout).validate(cfg, tp * pp)
    inputs = build_inputs(cfg, image, video, seed, max_tiles, max_frames)
    for inp in inputs:
        log(f"verify: input {inp.name}: {inp.input_ids.shape[1]} tokens" + (f", {inp.media}" if inp.media else ""))
    reference = hf_logits(hf_dir, inputs, dtype)
    log(f"verify: HF reference done; running megatron-core at TP={tp} PP={pp}"
        + (f" VPP={vpp}" if vpp else "") + (" SP" if sequence_parallel else "") + f" on {tp * pp} ranks")
    per_rank = platform.spawn(megatron_logits_rank, tp * pp, hf_dir, layout, inputs, dtype,
                              timeout=timeout, backend=backend)
    candidate = next(r for r in per_rank if r is not None)
    stats = []
    for inp, ref, cand in zip(inputs, reference, candidate):
        s = compare(ref, cand)
        stats.append(s)
        log(f"verify: {inp.name:<11} positions={s['positions']:<5d} cosine={s['cosine']:.8f} "
            f"max_abs={s['max_abs']:.3e} top1={s['top1']:.2f}%")
    total = sum(s["positions"] for s in stats)
    summary = {
        "cosine": min(s["cosine"] for s in stats),
        "max_abs": max(s["max_abs"] for s in stats),
        "top1": sum(s["top1"] * s["positions"] for s in stats) / total,
    }
    summary["passed"] = dtype != "fp32" or (summary["cosine"] >= COSINE_MIN and summary["top1"] >= TOP1_MIN)
    log(f"verify: cosine={summary['cosine']:.8f} max_abs={summary['max_abs']:.3e} top1={summary['top1']:.2f}%")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="Long-VITA checkpoint in HF format")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--vpp", "--virtual-pipeline-model-parallel-size", dest="vpp", type=int, default=None,
                        help="model chunks per pipeline rank (interleaved schedule)")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--image", metavar="PATH", help="image file (default: a generated image)")
    parser.add_argument("--video", metavar="PATH", help="video file or frame directory (default: generated frames)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="compute dtype of both models; pass/fail thresholds apply to fp32")
    parser.add_argument("--max-tiles", type=int, default=12, help="image tiling grid limit (1..12)")
    parser.add_argument("--max-frames", type=int, default=8, help="frames sampled from --video")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random text tokens")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the spawned ranks are killed")


def run(args: argparse.Namespace) -> int:
    for path, flag in ((args.image, "--image"), (args.video, "--video")):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    summary = verify(args.hf, args.tp, args.pp, args.vpp, args.sequence_parallel, args.image, args.video,
                     args.dtype, args.seed, args.max_tiles, args.max_frames, args.timeout, args.backend)
    return 0 if summary["passed"] else 1
