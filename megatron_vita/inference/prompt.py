"""The prompt of a generation request, built by the training data pipeline, and chat-history files.

Owns `build_prompt(request, tokenizer, model_config) -> (input_ids, pixel_values)`, the one
prompt builder of every inference path (HF, megatron-core engine, serve, eval). It does not lay
out tokens itself: the request becomes a training-format record (`GenerationRequest.to_record`)
and goes through `data.loader.RecordEvaluator.prompt`, i.e. `data.sample.SampleBuilder` and
`data.template.ChatEncoder` -- ChatML, `<image>` tiling with the thumbnail first, `<video>`
frames sampled at <= max_fps and <= max_num_frame -- under a Recipe made here from the
request's limits (no YAML file). Train and infer therefore cannot drift.

Inference differs from training in two documented ways (shared/reference/longvita.md):
- a request without a system turn gets the default "You are a helpful assistant.";
- the prompt ends with `<|im_start|>assistant\n` (RecordEvaluator.prompt appends it).

A prompt longer than `max_seq_len` allows (room for at least one answer token) follows
training's `fewer_frames` oversize policy: its videos are resampled with the largest frame
limit that fits (logged on stderr); a prompt that still does not fit, or has no video to thin,
is refused with one line saying by how much it is too long.

Also owns `load_history`: a chat-history JSON file (a list of turns, or a record with
`messages` / `images` / `videos`) for `infer --history`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Sequence, Tuple

from megatron_vita.config.parallel import ConfigError
from megatron_vita.inference.api import GenerationRequest, Turn

logger = logging.getLogger("megatron_vita.inference")

DEFAULT_SYSTEM = "You are a helpful assistant."
# Media paths of a request are local files the caller vetted (api.py): any absolute path is allowed.
_FS_ROOT = os.path.abspath(os.sep)


def with_default_system(request: GenerationRequest) -> List[Turn]:
    """The request's turns, behind the default system turn unless it has one of its own."""
    if any(t.role == "system" for t in request.turns):
        return list(request.turns)
    return [Turn("system", DEFAULT_SYSTEM)] + list(request.turns)


def media_problems(request: GenerationRequest) -> List[str]:
    """One line per medium that is not there (images: files; videos: files or frame directories)."""
    out = []
    for path in request.images:
        if not os.path.isfile(path):
            why = "is a directory, not an image file" if os.path.isdir(path) else "no such file"
            out.append(f"image {path}: {why}")
    for path in request.videos:
        if not os.path.exists(path):
            out.append(f"video {path}: no such file or frame directory")
    return out


def request_problems(request: GenerationRequest) -> List[str]:
    """Everything wrong with a request that needs no model: its values and tags
    (GenerationRequest.problems), the frame rate cap, and media that are not there."""
    out = request.problems()
    if not request.max_fps > 0:
        out.append(f"--max_fps must be > 0, got {request.max_fps}")
    return out + media_problems(request)


def tokenizer_problems(tokenizer, model_config, where: str = "the tokenizer") -> List[str]:
    """The tokenizer must give the special tokens the ids the model's config expects (a wrong
    tokenizer would place visual features at the wrong tokens without any error)."""
    from megatron_vita.data.template import token_ids_from_tokenizer

    try:
        got = token_ids_from_tokenizer(tokenizer)
    except ValueError as e:
        return [f"{where}: {e}"]
    want = model_config.tokens
    out = []
    for name in ("im_start_token_id", "eos_token_id"):
        if getattr(got, name) != getattr(want, name):
            out.append(f"{where}: {name} is {getattr(got, name)} but the model's config says {getattr(want, name)}")
    wrong = [t for t, i in want.special.items() if got.special.get(t) != i]
    if wrong:
        out.append(f"{where}: special tokens {wrong[:4]}{'...' if len(wrong) > 4 else ''} have other ids than "
                   "the model's config (a tokenizer of another model?)")
    if len(tokenizer) > model_config.language.vocab_size:
        out.append(f"{where}: {len(tokenizer)} tokens, more than the model's vocabulary "
                   f"{model_config.language.vocab_size}")
    return out


def inference_recipe(request: GenerationRequest, seq_length: int, max_frames: Optional[int] = None):
    """The Recipe a request's prompt is built under: the request's video limits, the released
    image tiling (1..12 tiles), no dataset (prompts read no dataset file), and training's
    `fewer_frames` oversize policy with `seq_length` as the room the prompt has."""
    from megatron_vita.data.recipe import DatasetEntry, ImageSettings, PackingSettings, Recipe, VideoSettings

    return Recipe(name="inference", stage=0, seq_length=seq_length,
                  datasets=[DatasetEntry(group="inference", path="<request>", ratio=0.0)],
                  image=ImageSettings(),
                  video=VideoSettings(max_frames=max_frames or request.max_num_frame, max_fps=request.max_fps),
                  packing=PackingSettings(mode="none", reset=False, oversize="fewer_frames"), path="<request>")


def context_limit(request: GenerationRequest, model_config) -> int:
    """Prompt + answer tokens allowed: --max_seq_len, else the model's position limit."""
    return request.max_seq_len or model_config.language.max_position_embeddings


def _record(request: GenerationRequest) -> dict:
    record = GenerationRequest(with_default_system(request), request.images, request.videos).to_record()
    # Relative paths are the caller's (cwd); the builder resolves against the filesystem root.
    record["images"] = [os.path.abspath(p) for p in record["images"]]
    record["videos"] = [os.path.abspath(p) for p in record["videos"]]
    return record


def build_prompt(request: GenerationRequest, tokenizer, model_config) -> Tuple[List[int], "torch.Tensor"]:  # noqa: F821
    """(input_ids, pixel_values float32 [n_tiles, 3, H, W] in token-block order) of a request,
    laid out exactly as the training pipeline lays out the same record. Raises ConfigError (one
    line per problem: bad values, tag/media mismatch, missing media), ValueError for media the
    data pipeline refuses (SampleError / MediaError: an undecodable image, a video without
    frames) and for a prompt longer than the context allows."""
    from megatron_vita.data.loader import RecordEvaluator
    from megatron_vita.data.readers import normalize_record

    problems = request_problems(request)
    if problems:
        raise ConfigError(problems)
    record = _record(request)
    limit = context_limit(request, model_config)
    # The evaluator's encoder gives the assistant header's length; the room for the prompt
    # leaves one answer token after it.
    recipe = inference_recipe(request, limit)
    evaluator = RecordEvaluator(recipe, tokenizer, model_config, _FS_ROOT)
    enc = evaluator.encoder
    header = 1 + len(enc.role_ids["assistant"]) + len(enc.newline_ids)
    room = recipe.seq_length = limit - header - 1
    conv = normalize_record(record, require_answer=False)
    doc, outcome = evaluator.builder.fit(conv, _FS_ROOT) if room >= 1 else (None, "oversize")
    if doc is None:
        full = len(evaluator.builder.build(conv, _FS_ROOT)) + header
        thinned = (f" ({len(evaluator.builder.build(conv, _FS_ROOT, max_frames=1)) + header} with one frame per "
                   "video)") if request.videos else ""
        what = f"--max_seq_len {limit}" if request.max_seq_len else f"the model's position limit {limit}"
        raise ValueError(f"the prompt is {full} tokens{thinned}; {what} leaves room for {max(room, 0) + header} "
                         "(at least one answer token must fit): give a larger --max_seq_len or fewer / smaller media")
    if outcome == "fewer_frames":
        # Training's fewer_frames policy: the largest frame limit whose resampled videos fit.
        logger.warning("videos resampled with at most %d frames each so that the prompt fits in %d tokens "
                       "(training's fewer_frames policy)", doc.max_frames, limit)
        recipe.video.max_frames = doc.max_frames
    ids, pixels, _ = evaluator.prompt(record, _FS_ROOT)
    if len(ids) != len(doc) + header:  # the planned and built prompts are one code path
        raise RuntimeError(f"prompt length changed between planning ({len(doc) + header}) and building ({len(ids)})")
    return ids, pixels


# ---- chat history ----------------------------------------------------------------------------
def load_history(path: str) -> Tuple[List[Turn], List[str], List[str]]:
    """(turns, images, videos) of a chat-history JSON file.

    Either a list of turns `[{"role": "user"|"assistant"|"system", "content": "..."}, ...]` or a
    training-format record `{"messages": [...], "images": [...], "videos": [...]}` whose tags
    refer to its media; relative media paths are relative to the file's folder. Roles take the
    data pipeline's aliases (human / gpt). Raises ConfigError with one line per problem.
    """
    from megatron_vita.data.template import ROLE_ALIASES

    if not os.path.isfile(path):
        raise ConfigError([f"--history {path}: no such file"])
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"--history {path}: not valid JSON ({e})"]) from None
    images: Sequence = []
    videos: Sequence = []
    if isinstance(data, dict):
        turns_raw = data.get("messages", data.get("conversations"))
        images, videos = data.get("images", []) or [], data.get("videos", []) or []
    else:
        turns_raw = data
    problems = []
    if not isinstance(turns_raw, list):
        raise ConfigError([f"--history {path}: expected a list of turns or an object with 'messages'"])
    turns = []
    for i, t in enumerate(turns_raw):
        role = t.get("role", t.get("from")) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role not in ROLE_ALIASES or not isinstance(content, str):
            problems.append(f"--history {path}: turn {i} needs a role ({', '.join(sorted(ROLE_ALIASES))}) "
                            f"and a text content")
            continue
        turns.append(Turn(ROLE_ALIASES[role], content))
    for key, value in (("images", images), ("videos", videos)):
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            problems.append(f"--history {path}: '{key}' must be a list of paths")
    if problems:
        raise ConfigError(problems)
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    return turns, [rel(p) for p in images], [rel(p) for p in videos]
