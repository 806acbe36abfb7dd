"""`megatron-vita infer`: answer one question about images / videos / text with a Long-VITA.

Owns the command line of inference, with the original's flag spellings (`--model_path`,
`--image_path`, `--video_path`, `--question`, `--max_seq_len`, `--max_num_frame`,
`--max_new_tokens`; the hyphenated forms work too). `--model_path` is either

- a Hugging Face directory (config.json): `inference.hf_generator.HFGenerator`, transformers'
  generate with its KV cache on this process's device; or
- a Megatron checkpoint (latest_checkpointed_iteration.txt, or an iter_XXXXXXX directory):
  `inference.engine.MegatronGenerator` on TP*PP*CP spawned ranks (or the torchrun processes),
  with the tokenizer from `--tokenizer`, else the one recorded at training time (the
  checkpoint's args: `--tokenizer`, else the recipe's under `--data-root`).

Everything is checked before a model is loaded, one line per problem: the model directory,
the tokenizer, each media file, the `<image>` / `<video>` tags against the media given, the
history file, sampling values, flags that do not apply to the chosen path.

stdout carries the answer and only the answer (followed by a newline); logs and progress go to
stderr. File descriptor 1 itself points at stderr while the model loads and runs, so nothing a
library or a spawned rank prints can reach stdout. `--stream` writes the answer's pieces as they
are decoded. Prompt layout: inference/prompt.py (the training pipeline's).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Iterator, List, Optional, TextIO, Tuple

from megatron_vita.config.parallel import ConfigError

# Flags of the megatron-core path (argparse dest -> how the command line spells it).
_MEGATRON_FLAGS = {"tp": "--tp", "pp": "--pp", "vpp": "--vpp", "cp": "--cp", "cp_algo": "--cp-algo",
                   "ulysses_degree_in_cp": "--ulysses-degree-in-cp", "prefill_chunk": "--prefill-chunk"}


def _both(name: str) -> List[str]:
    """The original's underscore spelling first, and the hyphenated one."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_vita.config.dtypes import DTYPES

    parser.add_argument(*_both("model_path"), dest="model_path", required=True, metavar="DIR",
                        help="a Long-VITA HF directory (transformers) or a Megatron checkpoint (megatron-core ranks)")
    parser.add_argument(*_both("question"), dest="question", required=True, metavar="Q",
                        help="the question; without <image>/<video> tags the media come first (videos, then images)")
    parser.add_argument(*_both("image_path"), dest="image_path", action="extend", nargs="+", default=[], metavar="P",
                        help="image file(s), in tag order (repeat the flag or give several)")
    parser.add_argument(*_both("video_path"), dest="video_path", action="extend", nargs="+", default=[], metavar="P",
                        help="video file(s) or frame directories, in tag order")
    parser.add_argument(*_both("max_seq_len"), dest="max_seq_len", type=int, default=None, metavar="N",
                        help="prompt + answer tokens (default: the model's position limit); a longer prompt gets "
                        "fewer video frames (training's fewer_frames policy), else is refused")
    parser.add_argument(*_both("max_num_frame"), dest="max_num_frame", type=int, default=4096, metavar="F",
                        help="frames sampled per video, at most --max_fps per second (default 4096)")
    parser.add_argument(*_both("max_fps"), dest="max_fps", type=float, default=1.0, help="frame sampling rate cap (1)")
    parser.add_argument(*_both("max_new_tokens"), dest="max_new_tokens", type=int, default=1024, metavar="T")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    parser.add_argument(*_both("top_p"), dest="top_p", type=float, default=1.0)
    parser.add_argument(*_both("top_k"), dest="top_k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument(*_both("repetition_penalty"), dest="repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--history", metavar="FILE", default=None,
                        help="chat history JSON: a list of {role, content} turns, or a record with messages / "
                        "images / videos (media relative to the file's folder); the question is the next user turn")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="system message (default: 'You are a helpful assistant.')")
    parser.add_argument("--stream", action="store_true", help="print the answer's pieces as they are decoded")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (default: the HF directory's, or the one a Megatron checkpoint's "
                        "training recorded)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype (default fp32)")
    add_model_path_arguments(parser)


# ---- what --model_path is -------------------------------------------------------------------

def add_model_path_arguments(parser: argparse.ArgumentParser) -> None:
    """The megatron-core path's layout flags and the kernel flags: `infer`, `serve` and `eval` share them."""
    from megatron_vita.config.features import add_feature_arguments

    mg = parser.add_argument_group("megatron-core path (a Megatron checkpoint)")
    mg.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=None)
    mg.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=None)
    mg.add_argument("--vpp", "--virtual-pipeline-model-parallel-size", dest="vpp", type=int, default=None)
    mg.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=None)
    mg.add_argument("--cp-algo", "--context-parallel-algo", dest="cp_algo", default=None,
                    help="ring (default), ulysses or hybrid (MindSpeed's names accepted)")
    mg.add_argument("--ulysses-degree-in-cp", dest="ulysses_degree_in_cp", type=int, default=None)
    mg.add_argument("--prefill-chunk", "--prefill_chunk", dest="prefill_chunk", type=int, default=None, metavar="N",
                    help="prefill the prompt N tokens at a time (activation memory bounded by the chunk)")
    add_feature_arguments(parser)

def model_kind(path: str) -> Optional[str]:
    """'hf', 'megatron' or None."""
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    from megatron_vita.checkpoint.megatron_layout import TRACKER

    base = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, TRACKER)) or base.startswith("iter_") or base == "release":
        return "megatron"
    if any(n.startswith("iter_") and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path)):
        return "megatron"
    return None


def _saved_args(checkpoint: str):
    """The `args` Namespace training stored with a Megatron checkpoint (None if there is none)."""
    from megatron_vita.checkpoint.megatron_layout import parse_rank_dir, resolve_iteration_dir
    from megatron_vita.checkpoint.safe_load import load_weights_only

    it_dir, _ = resolve_iteration_dir(checkpoint)
    common = os.path.join(it_dir, "common.pt")  # torch_dist
    if os.path.isfile(common):
        return load_weights_only(common).get("args")
    for name in sorted(os.listdir(it_dir)):  # legacy: rank files carry args
        if parse_rank_dir(name):
            f = os.path.join(it_dir, name, "model_optim_rng.pt")
            if os.path.isfile(f):
                return load_weights_only(f, mmap=True).get("args")
    return None


def recorded_tokenizer(checkpoint: str) -> Optional[str]:
    """The tokenizer a Megatron checkpoint was trained with, as training resolved it: its
    `--tokenizer`, else the recipe's `tokenizer` (default "tokenizer") under `--data-root`;
    MindSpeed / Megatron-LM args name it `tokenizer_name_or_path` / `tokenizer_model`. Relative
    paths are as training saw them (relative to where it ran). None if nothing is recorded."""
    args = _saved_args(checkpoint)
    if args is None:
        return None
    for key in ("tokenizer", "tokenizer_name_or_path", "tokenizer_model"):
        if getattr(args, key, None):
            return getattr(args, key)
    recipe_path, data_root = getattr(args, "recipe", None), getattr(args, "data_root", None)
    if not data_root:
        return None
    name = "tokenizer"
    if recipe_path and os.path.isfile(recipe_path):
        from megatron_vita.data.recipe import load_recipe

        name = load_recipe(recipe_path).tokenizer or name
    return name if os.path.isabs(name) else os.path.join(data_root, name)


# ---- the request ----------------------------------------------------------------------------
def build_request(args: argparse.Namespace, problems: List[str]):
    """The GenerationRequest of the command line (history + question); problems appended."""
    from megatron_vita.inference.api import GenerationRequest, SamplingParams, Turn, single_turn

    turns: List[Turn] = []
    images: List[str] = []
    videos: List[str] = []
    if args.history:
        from megatron_vita.inference.prompt import load_history

        try:
            turns, images, videos = load_history(args.history)
        except ConfigError as e:
            problems += e.problems
    if args.system is not None:
        if any(t.role == "system" for t in turns):
            problems.append(f"--system given but --history {args.history} has a system turn already")
        turns = [Turn("system", args.system)] + turns
    if turns and turns[-1].role == "user":
        problems.append(f"--history {args.history}: its last turn is the user's; the question would be a second "
                        "user turn in a row (end the history with the assistant's answer)")
    question = single_turn(args.question, images=args.image_path, videos=args.video_path)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    request = GenerationRequest(turns + question.turns, images=images + list(args.image_path),
                                videos=videos + list(args.video_path), sampling=sampling,
                                max_num_frame=args.max_num_frame, max_fps=args.max_fps,
                                max_seq_len=args.max_seq_len)
    return request


def model_problems(args: argparse.Namespace) -> Tuple[Optional[str], Optional[str], List[str]]:
    """(kind, tokenizer dir, problems) of --model_path and the flags that go with it, before any
    model loads: what it is, its files, the tokenizer (a Megatron checkpoint's recorded one by
    default), the megatron-core flags and kernel flags an HF directory cannot take. Shared by
    `infer`, `serve` and `eval` (args: model_path, tokenizer, tp, pp, vpp, cp, cp_algo,
    ulysses_degree_in_cp, prefill_chunk and the kernel flags)."""
    from megatron_vita.config.features import enabled_features

    problems: List[str] = []
    kind, tokenizer = model_kind(args.model_path), args.tokenizer
    if kind is None:
        problems.append(f"--model_path {args.model_path}: " + (
            "no such directory" if not os.path.isdir(args.model_path) else
            "neither a Hugging Face directory (config.json) nor a Megatron checkpoint "
            "(latest_checkpointed_iteration.txt or iter_* directories)"))
    elif kind == "hf":
        from megatron_vita.inference.hf_generator import hf_dir_problems

        problems += hf_dir_problems(args.model_path, args.tokenizer)
        for dest, flag in _MEGATRON_FLAGS.items():
            if getattr(args, dest, None) is not None:
                problems.append(f"{flag} applies to a Megatron checkpoint; {args.model_path} is an HF directory "
                                "(transformers runs it in this process; megatron-vita convert makes a Megatron one)")
        for name in enabled_features(args):
            problems.append(f"--{name}: kernel flags apply to the megatron-core path; {args.model_path} is an HF "
                            "directory (transformers runs it unpatched)")
    else:
        for dest in ("tp", "pp", "vpp", "cp", "prefill_chunk"):
            value = getattr(args, dest, None)
            if value is not None and value < 1:
                problems.append(f"{_MEGATRON_FLAGS[dest]} must be >= 1, got {value}")
        if tokenizer is None:
            try:
                tokenizer = recorded_tokenizer(args.model_path)
            except (OSError, ValueError, RuntimeError) as e:
                problems.append(f"--model_path {args.model_path}: {e}")
            else:
                if tokenizer is None:
                    problems.append(f"--model_path {args.model_path}: its training recorded no tokenizer; pass "
                                    "--tokenizer DIR")
                elif not os.path.isdir(tokenizer):
                    problems.append(f"--model_path {args.model_path}: the tokenizer recorded at training time, "
                                    f"{tokenizer}, is not a directory here (relative to where training ran?); "
                                    "pass --tokenizer DIR")
        elif not os.path.isdir(tokenizer):
            problems.append(f"--tokenizer {tokenizer}: no such directory")
    return kind, tokenizer, problems


def check(args: argparse.Namespace):
    """(kind, request, tokenizer dir) after checking everything a model load does not need;
    ConfigError with one line per problem."""
    from megatron_vita.inference.prompt import request_problems

    kind, tokenizer, problems = model_problems(args)
    request = build_request(args, problems)
    problems += request_problems(request)
    if problems:
        raise ConfigError(problems)
    return kind, request, tokenizer


def make_generator(kind: str, args: argparse.Namespace, tokenizer: Optional[str]):
    if kind == "hf":
        from megatron_vita.inference.hf_generator import HFGenerator

        return HFGenerator(args.model_path, backend=args.backend, dtype=args.dtype, tokenizer=tokenizer)
    from megatron_vita.config.features import enabled_features
    from megatron_vita.config.parallel import ParallelConfig
    from megatron_vita.inference.engine import MegatronGenerator  # written by the engine's owner; lazily

    par = ParallelConfig(tensor_model_parallel_size=args.tp or 1, pipeline_model_parallel_size=args.pp or 1,
                         virtual_pipeline_model_parallel_size=args.vpp, context_parallel_size=args.cp or 1,
                         context_parallel_algo=args.cp_algo or "ring", ulysses_degree_in_cp=args.ulysses_degree_in_cp)
    return MegatronGenerator(args.model_path, par, tokenizer=tokenizer, backend=args.backend,
                             features=tuple(enabled_features(args)), prefill_chunk=args.prefill_chunk,
                             dtype=args.dtype)


@contextlib.contextmanager
def answer_channel() -> Iterator[TextIO]:
    """A text stream onto the real stdout, while file descriptor 1 (and sys.stdout) lead to
    stderr: whatever transformers, megatron or a spawned rank prints cannot mix into the answer."""
    sys.stdout.flush()
    saved = os.dup(1)
    out = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        yield out
    finally:
        out.flush()
        out.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args: argparse.Namespace) -> int:
    kind, request, tokenizer = check(args)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[infer] %(message)s")
    # Under torchrun every process runs this command; the first one answers.
    speaker = os.environ.get("RANK", "0") == "0"
    with answer_channel() as out:
        print(f"[infer] {kind} path: loading {args.model_path}", file=sys.stderr)
        generator = make_generator(kind, args, tokenizer)
        try:
            if args.stream:
                for piece in generator.stream(request):
                    if speaker:
                        out.write(piece)
                        out.flush()
                if speaker:
                    out.write("\n")
            else:
                result = generator.generate(request)
                print(f"[infer] {result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated "
                      f"({result.finish_reason})", file=sys.stderr)
                if speaker:
                    out.write(result.text + "\n")
        finally:
            close = getattr(generator, "close", None)
            if close is not None:
                close()
    return 0
