"""`megatron-vita verify`: the same inputs through two checkpoints, compared logit by logit.

Reference: a HF checkpoint run by transformers (`--hf`), or a Megatron checkpoint
(`--reference-megatron`). Candidate: megatron-core at a layout (TP/PP/VPP/CP/SP) loaded from the
reference's HF weights (the default), megatron-core loaded from a Megatron checkpoint of any
format, layout and naming (`--megatron`, at the checkpoint's own layout unless --tp/--pp/--vpp/--cp
are given), or a second HF checkpoint (`--candidate-hf`). megatron-core runs on TP*PP*CP spawned
ranks over real process groups. Inputs: a text sequence, an image (tiled exactly like training
data) with text around it, and video frames with text. `--seq-length L` makes every input L
tokens long (the text longer, and the video as many frames as fill about L tokens, bounded by the
frames the video has), so that under context parallelism every input spans all 2*CP chunks of
the load-balanced split and media straddle chunk boundaries. Logits are compared per position; the
last line printed is

    verify: cosine=<min cosine> max_abs=<max |diff|> top1=<agreement %>

and the exit status is 1 when the cosine or the top-1 agreement is below the threshold of the
compute dtype (`THRESHOLDS`; fp32: cosine >= 0.9999 and top-1 100%). Both checkpoints are opened
and checked (names, shapes, safe pickles, complete data files) before anything runs, so a bad
checkpoint is one error line naming the file, never a rank's traceback.
`megatron-vita convert --verify` runs the same comparison between its input and output.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_vita.config.dtypes import DTYPES, torch_dtype
from megatron_vita.config.features import add_feature_arguments, enabled_features
from megatron_vita.config.parallel import ConfigError, ParallelConfig

if TYPE_CHECKING:  # torch is imported inside functions: `--help` stays fast
    import torch

# dtype -> (min cosine, min top-1 agreement %) for a verify to pass. fp32 is exact up to op order.
# bf16 / fp16 were measured on correct conversions of the tiny preset (3 random checkpoints x
# 4 input seeds x text/image/video, TP1 and TP2 PP2, transformers vs megatron-core):
#   bf16: min cosine 0.99965, top-1 >= 91.7% per input and >= 95.6% per verify run;
#   fp16: min cosine 0.999993, top-1 >= 97.2% per input and >= 99.1% per verify run.
# Wrong checkpoints of the same model (two LLM layers swapped; one layer's gate_proj replaced by
# its up_proj, or k_proj by v_proj; one o_proj zeroed) gave cosine <= 0.955 and top-1 <= 76% in
# every dtype (1% noise on one down_proj is invisible in any dtype; 5% is within bf16's). The limits
# leave ~10x the measured bf16 error in (1 - cosine) for deeper models and longer sequences,
# and still sit well above every wrong checkpoint.
THRESHOLDS = {"fp32": (0.9999, 100.0), "bf16": (0.995, 85.0), "fp16": (0.9995, 90.0)}
COSINE_MIN, TOP1_MIN = THRESHOLDS["fp32"]


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


# Text tokens before and after the media of the image / video inputs (their minimum with --seq-length).
_IMAGE_TEXT, _VIDEO_TEXT = 8, 6


def _video_frames(video: Optional[str], size: int, max_frames: int, wanted: Optional[int]):
    """(frames [n, 3, size, size], description). Without `wanted`: the sampling rule of training data
    (<= 1 fps, at most max_frames). With it (--seq-length): `wanted` frames spread evenly over the
    video, or every frame when it has fewer."""
    from megatron_vita.data.video import load_video_frames, probe_video

    if not video:
        n = wanted or min(max_frames, 4)
        return _synthetic_video(size, n), f"{n} frames from a generated video"
    if wanted is None:
        frames, _ = load_video_frames(video, size, max_num_frames=max_frames)
        return frames, f"{frames.shape[0]} frames from {video}"
    total = probe_video(video).num_frames
    n = min(wanted, total)
    frames, _ = load_video_frames(video, size, max_num_frames=n, indices=[i * total // n for i in range(n)])
    return frames, f"{frames.shape[0]} frames from {video} (of its {total}, for --seq-length)"


def build_inputs(cfg, image: Optional[str] = None, video: Optional[str] = None, seed: int = 0,
                 max_tiles: int = 12, max_frames: int = 8, seq_length: Optional[int] = None) -> List[VerifyInput]:
    """Text, image+text and video+text inputs in the Long-VITA token layout.

    `seq_length` L: the text input is L tokens; the image keeps its tiling and the text after it
    grows so the input is L tokens; the video gets the frames that fill about L tokens (bounded by
    the frames a `video` file has), then text up to L. Media longer than L are kept whole."""
    import torch

    from megatron_vita.data.image import load_image_tiles
    from megatron_vita.data.template import image_token_ids, video_token_count, video_token_ids

    rng = np.random.default_rng(seed)
    T, size = cfg.num_image_token, cfg.vision.image_size
    newline = _text_ids(cfg, 1, rng)
    inputs = [VerifyInput("text", torch.tensor([_text_ids(cfg, seq_length or 48, rng)]), None)]

    def around(media: List[int], before: int) -> List[int]:
        after = max(before, (seq_length or 0) - before - len(media))
        return _text_ids(cfg, before, rng) + media + _text_ids(cfg, after, rng)

    tiles, grid = load_image_tiles(image if image else _synthetic_image(size), size, max_num=max_tiles)
    ids = around(image_token_ids(tiles.shape[0], grid, cfg.tokens, T, newline), _IMAGE_TEXT)
    inputs.append(VerifyInput("image+text", torch.tensor([ids]), tiles,
                              f"{tiles.shape[0]} tiles (grid {grid[0]}x{grid[1]}) from {image or 'a generated image'}"))

    wanted = None
    if seq_length is not None:
        wanted = max(1, (seq_length - 2 * _VIDEO_TEXT) // video_token_count(1, T))
    frames, media = _video_frames(video, size, max_frames, wanted)
    ids = around(video_token_ids(frames.shape[0], cfg.tokens, T), _VIDEO_TEXT)
    inputs.append(VerifyInput("video+text", torch.tensor([ids]), frames, media))
    return inputs


def hf_logits(hf_dir: str, inputs: List[VerifyInput], dtype: str = "fp32",
              backend: Optional[str] = None) -> List["torch.Tensor"]:
    import torch
    from transformers import AutoModelForCausalLM

    import megatron_vita  # noqa: F401  (registers the Long-VITA Auto classes)
    from megatron_vita.platform import placement

    # The reference runs on the platform's device too (`backend` as the megatron side's ranks);
    # its logits come back to the host.
    device = placement.device(backend)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype(dtype)).eval().to(device)
    out = []
    with torch.no_grad():
        for inp in inputs:
            images = None if inp.pixel_values is None else inp.pixel_values.to(device, model.dtype)
            out.append(model(input_ids=inp.input_ids.to(device), images=images).logits.float().cpu())
    return out


@dataclass
class CheckpointRef:
    """One side of a comparison: a checkpoint, and how to run it.

    kind "hf" runs transformers, or megatron-core loaded from the HF weights when a `layout` is
    given; kind "megatron" runs megatron-core loaded from a Megatron checkpoint of any format,
    layout and naming, at `layout` or else at the checkpoint's own. `model` is the config spec
    for Megatron checkpoints that carry none (released MindSpeed / TE weights).
    """

    kind: str
    path: str
    model: Optional[str] = None
    layout: Optional[ParallelConfig] = None
    _opened: object = field(default=None, init=False, repr=False, compare=False)

    def config(self):
        from megatron_vita.config.model import ModelConfig

        if self.kind == "hf":
            return ModelConfig.from_hf_dir(self.path)
        if self.kind != "megatron":
            raise ValueError(f"unknown checkpoint kind {self.kind!r}: use hf or megatron")
        return self._source().cfg

    def check(self) -> None:
        """Open the checkpoint as the converter would: names and shapes against its config, pickles
        through the safe loaders, data files complete. Raises one error naming the file."""
        self._source()

    def _source(self):
        if self._opened is None:
            from megatron_vita.checkpoint.sources import open_source

            source = open_source(self.kind, self.path, self.model)
            source.close()
            self._opened = source
        return self._opened

    def with_layout(self, **changes) -> "CheckpointRef":
        """Run at the checkpoint's own layout (HF: TP1 PP1) with `changes` (ParallelConfig fields)."""
        own = self._source().layout if self.kind == "megatron" else ParallelConfig()
        self.layout = dataclasses.replace(own, **changes)
        return self

    def resolved_layout(self) -> Optional[ParallelConfig]:
        """The megatron-core layout to run at (its vocab divisor the checkpoint's), or None for transformers."""
        if self.kind == "hf" or self.layout is not None:
            return self.layout
        return self._source().layout

    def describe(self, layout: Optional[ParallelConfig]) -> str:
        if layout is None:
            return f"HF transformers {self.path}"
        return (f"megatron-core at {layout.describe()} on {layout.model_parallel_size} ranks from "
                f"{'HF ' if self.kind == 'hf' else 'Megatron '}{self.path}")


def logits_of(ref: CheckpointRef, layout: Optional[ParallelConfig], cfg, inputs: List[VerifyInput],
              dtype: str = "fp32", timeout: float = 900, backend: Optional[str] = None,
              features: Sequence[str] = ()) -> Tuple[List["torch.Tensor"], str]:
    """Logits of every input on one side, run at `layout` (None: transformers); returns (logits, description).
    `features`: kernel flags the megatron-core ranks apply (transformers never gets them)."""
    if layout is None:
        return hf_logits(ref.path, inputs, dtype, backend), ref.describe(None)
    from megatron_vita.inference.forward import megatron_logits

    results, how = megatron_logits(cfg, ref.kind, ref.path, layout, inputs, dtype, timeout, backend,
                                   features=features)
    kernels = f", kernels: {', '.join('--' + f for f in features)}" if features else ""
    return results, f"{ref.describe(layout)} ({how}{kernels})"


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


def run_problems(cfg, run: Optional[ParallelConfig], seq_length: Optional[int], features: Sequence[str] = (),
                 backend: Optional[str] = None, dtype: Optional[str] = None) -> List[str]:
    """Every reason the inputs or a side's megatron-core layout cannot run, one line each naming the flag.

    The layout gets ParallelConfig's checks for its TP*PP*CP ranks; kernel flags, whether the
    backend can run them. No sequence-length rule of context parallelism applies: forward_only
    pads each input to the CP multiple itself."""
    errs = []
    if seq_length is not None and seq_length < 1:
        errs.append(f"--seq-length must be >= 1 (got {seq_length})")
    if run is not None:
        errs += run.problems(cfg, max(run.model_parallel_size, 1))
    if features:
        from megatron_vita.platform.features import feature_problems
        from megatron_vita.platform import resolve_backend

        errs += feature_problems(resolve_backend(backend), features, dtype)
        if run is None:
            errs.append(f"{' '.join('--' + f for f in features)}: the kernel flags apply to megatron-core, "
                        "but the candidate runs transformers (--candidate-hf)")
    return errs


def verify_pair(reference: CheckpointRef, candidate: CheckpointRef, image: Optional[str] = None,
                video: Optional[str] = None, dtype: str = "fp32", seed: int = 0, max_tiles: int = 12,
                max_frames: int = 8, timeout: float = 900, backend: Optional[str] = None, log=print,
                seq_length: Optional[int] = None, features: Sequence[str] = ()) -> Dict[str, float]:
    """Compare the logits of two checkpoints; returns the summary (min cosine, max |diff|, top-1 %, passed).

    `features`: kernel flags (MindSpeed's names, e.g. 'use-fused-rmsnorm') the candidate's
    megatron-core ranks apply; the reference runs without them, so the patched model is checked
    against the unpatched reference."""
    from megatron_vita.checkpoint.sources import config_differences

    cfg = reference.config()
    other = candidate.config()
    reference.check()  # a broken checkpoint is one line here, not a rank's traceback later
    candidate.check()
    diffs = config_differences(cfg, other)
    if diffs:
        raise ValueError(f"{reference.path} and {candidate.path} describe different models: " + "; ".join(diffs))
    ref_run, cand_run = reference.resolved_layout(), candidate.resolved_layout()
    errs = run_problems(cfg, cand_run, seq_length, features, backend, dtype)  # fails before the reference runs
    if errs:
        raise ConfigError(errs)
    inputs = build_inputs(cfg, image, video, seed, max_tiles, max_frames, seq_length)
    for inp in inputs:
        log(f"verify: input {inp.name}: {inp.input_ids.shape[1]} tokens" + (f", {inp.media}" if inp.media else ""))
    ref_logits, ref_desc = logits_of(reference, ref_run, cfg, inputs, dtype, timeout, backend)
    log(f"verify: reference done ({ref_desc}); running {candidate.describe(cand_run)}")
    cand_logits, cand_desc = logits_of(candidate, cand_run, cfg, inputs, dtype, timeout, backend, features)
    log(f"verify: candidate done ({cand_desc})")
    stats = []
    for inp, ref, cand in zip(inputs, ref_logits, cand_logits):
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
    cos_min, top1_min = THRESHOLDS[dtype]
    summary["passed"] = summary["cosine"] >= cos_min and summary["top1"] >= top1_min
    log(f"verify: {'passed' if summary['passed'] else 'FAILED'} ({dtype} needs cosine >= {cos_min} "
        f"and top-1 >= {top1_min:g}%)")
    log(f"verify: cosine={summary['cosine']:.8f} max_abs={summary['max_abs']:.3e} top1={summary['top1']:.2f}%")
    return summary


# The layout flags of `verify` (argparse dest -> ParallelConfig field).
_LAYOUT_FLAGS = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
                 "vpp": "virtual_pipeline_model_parallel_size", "cp": "context_parallel_size",
                 "cp_algo": "context_parallel_algo", "ulysses_degree_in_cp": "ulysses_degree_in_cp",
                 "sequence_parallel": "sequence_parallel"}
# How the command line spells each of them, for refusals.
_FLAG_NAMES = {"tp": "--tp", "pp": "--pp", "vpp": "--vpp", "cp": "--cp", "cp_algo": "--cp-algo",
               "ulysses_degree_in_cp": "--ulysses-degree-in-cp", "sequence_parallel": "--sequence-parallel"}


def verify(hf_dir: str, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, sequence_parallel: bool = False,
           image: Optional[str] = None, video: Optional[str] = None, dtype: str = "fp32", seed: int = 0,
           max_tiles: int = 12, max_frames: int = 8, timeout: float = 900, backend: Optional[str] = None,
           log=print, megatron_dir: Optional[str] = None, model: Optional[str] = None, cp: int = 1,
           cp_algo: str = "ring", ulysses_degree_in_cp: Optional[int] = None,
           seq_length: Optional[int] = None) -> Dict[str, float]:
    """HF (transformers) vs megatron-core at TP/PP/VPP/CP/SP, loaded from the same HF directory or,
    with `megatron_dir`, from a Megatron checkpoint (its own layout unless tp/pp/vpp/cp are given)."""
    layout = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                            context_parallel_algo=cp_algo, ulysses_degree_in_cp=ulysses_degree_in_cp,
                            sequence_parallel=sequence_parallel)
    if megatron_dir is None:
        candidate = CheckpointRef("hf", hf_dir, layout=layout)
    else:
        # A Megatron checkpoint runs at its own layout except where an argument leaves the default.
        candidate = CheckpointRef("megatron", megatron_dir, model)
        default = ParallelConfig()
        changes = {name: getattr(layout, name) for name in _LAYOUT_FLAGS.values()
                   if getattr(layout, name) != getattr(default, name)}
        if changes:
            candidate.with_layout(**changes)
    return verify_pair(CheckpointRef("hf", hf_dir), candidate, image, video, dtype, seed, max_tiles, max_frames,
                       timeout, backend, log, seq_length)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", metavar="DIR", help="reference: a Long-VITA checkpoint in HF format (transformers)")
    parser.add_argument("--megatron", metavar="DIR", help="candidate: a Megatron checkpoint (torch_dist or legacy, any "
                        "naming) run by megatron-core; default: megatron-core loaded from --hf")
    parser.add_argument("--reference-megatron", metavar="DIR",
                        help="reference: a Megatron checkpoint instead of --hf (compares two Megatron checkpoints)")
    parser.add_argument("--candidate-hf", metavar="DIR", help="candidate: a second HF checkpoint run by transformers")
    parser.add_argument("--model", metavar="SPEC", help="model config for Megatron checkpoints without one "
                        "(released MindSpeed/TE weights): preset, HF directory or config JSON")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=None,
                        help="megatron-core layout (default 1, or a Megatron checkpoint's own)")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=None)
    parser.add_argument("--vpp", "--virtual-pipeline-model-parallel-size", dest="vpp", type=int, default=None,
                        help="model chunks per pipeline rank (interleaved schedule)")
    parser.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=None,
                        help="context-parallel ranks of the megatron-core side (default 1, or a Megatron "
                        "checkpoint's own); the world is TP*PP*CP ranks")
    parser.add_argument("--cp-algo", "--context-parallel-algo", dest="cp_algo", default=None,
                        help="ring (default), ulysses or hybrid; MindSpeed's megatron_cp_algo, ulysses_cp_algo, "
                        "hybrid_cp_algo are accepted")
    parser.add_argument("--ulysses-degree-in-cp", type=int, default=None,
                        help="hybrid: Ulysses ranks inside each ring rank")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens of every input (the text longer, the video more frames) so that each spans "
                        "all 2*CP chunks; default: short inputs (48 text tokens, 4 generated frames)")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--image", metavar="PATH", help="image file (default: a generated image)")
    parser.add_argument("--video", metavar="PATH", help="video file or frame directory (default: generated frames)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="compute dtype of both models; each has its pass/fail thresholds "
                        "(min cosine / top-1): " + "; ".join(f"{k} {c} / {t:g}%%" for k, (c, t) in THRESHOLDS.items()))
    parser.add_argument("--max-tiles", type=int, default=12, help="image tiling grid limit (1..12)")
    parser.add_argument("--max-frames", type=int, default=8, help="frames sampled from --video")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random text tokens")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the spawned ranks are killed")
    # MindSpeed's kernel flags (--use-flash-attn, --use-fused-rmsnorm, ...) for the candidate's ranks.
    add_feature_arguments(parser)


def _layout_flags(args) -> Dict:
    """The ParallelConfig fields the command line set (a flag not given keeps the checkpoint's value)."""
    given = {name: getattr(args, dest) for dest, name in _LAYOUT_FLAGS.items()}
    given["sequence_parallel"] = given["sequence_parallel"] or None
    return {k: v for k, v in given.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    for path, flag in ((args.image, "--image"), (args.video, "--video")):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if (args.hf is None) == (args.reference_megatron is None):
        raise ValueError("give exactly one reference: --hf DIR or --reference-megatron DIR")
    if args.megatron and args.candidate_hf:
        raise ValueError("give at most one candidate: --megatron DIR or --candidate-hf DIR")
    if args.candidate_hf:
        # transformers runs the candidate: a layout flag would be silently ignored.
        ignored = [_FLAG_NAMES[dest] for dest in _LAYOUT_FLAGS if getattr(args, dest) not in (None, False)]
        if ignored:
            raise ConfigError([f"{flag} sets the megatron-core layout, but --candidate-hf runs transformers: "
                               "give --megatron DIR (or drop --candidate-hf) to run megatron-core" for flag in ignored])
    if args.hf:
        reference = CheckpointRef("hf", args.hf)
    else:
        reference = CheckpointRef("megatron", args.reference_megatron, args.model)
    flags = _layout_flags(args)
    if args.megatron:
        candidate = CheckpointRef("megatron", args.megatron, args.model)
        if flags:
            candidate.with_layout(**flags)
    elif args.candidate_hf:
        candidate = CheckpointRef("hf", args.candidate_hf)
    elif args.hf:
        candidate = CheckpointRef("hf", args.hf).with_layout(**flags)
    else:
        raise ValueError("--reference-megatron needs a candidate: --megatron DIR or --candidate-hf DIR")
    summary = verify_pair(reference, candidate, args.image, args.video, args.dtype, args.seed, args.max_tiles,
                          args.max_frames, args.timeout, args.backend, seq_length=args.seq_length,
                          features=enabled_features(args))
    return 0 if summary["passed"] else 1
