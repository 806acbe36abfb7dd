"""The original Long-VITA Megatron server's `PUT /api`, so its client keeps working.

Body (as Long-VITA's Flask server and its VLMEvalKit client `LongVITAWrapper` use it):
`prompts` (a list of questions, or one chat as a list of `{role, content}` messages) whose text
holds `<image>` / `<video>` tags, `image_path_list` / `video_path_list` (local paths: here only
under `--media-root`), `image_list` (bare base64 images), `max_num_frame`, `tokens_to_generate`
(default 64, as there). As in the original, the media lists belong to every prompt, images whose
prompt has `<video>` tags and no `<image>` tag are one-frame videos (its Video-MME frame mode),
decoding is greedy whatever sampling fields are sent, and the answer is `{"text": [answer, ...]}`
(one per prompt). Errors carry `message` at the top level, which the client prints.
"""
from __future__ import annotations

from typing import Any, Dict, List

from megatron_vita.inference.api import IMAGE_TAG, VIDEO_TAG, GenerationRequest, SamplingParams, Turn
from megatron_vita.serve.media import IMAGE, VIDEO, RequestMedia
from megatron_vita.serve.settings import LEGACY_DEFAULT_TOKENS, ApiError, ServeSettings, limit_error

MAX_PROMPTS = 128  # the original's limit


def parse_legacy_request(body: Any, settings: ServeSettings, media: RequestMedia) -> List[GenerationRequest]:
    """One GenerationRequest per prompt of a PUT /api body; media land in `media`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
    if "prompts" not in body:
        raise ApiError(400, "prompts argument required", param="prompts", code="missing_parameter")
    for old, new in (("max_len", "tokens_to_generate"), ("sentences", "prompts")):
        if old in body:
            raise ApiError(400, f"{old} is no longer used.  Replace with {new}", param=old, code="invalid_value")
    prompts = body["prompts"]
    if not isinstance(prompts, list):
        raise ApiError(400, "prompts is not a list of strings", param="prompts", code="invalid_value")
    if not prompts:
        raise ApiError(400, "prompts is empty", param="prompts", code="invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"Maximum number of prompts is {MAX_PROMPTS}", param="prompts", code="invalid_value")
    if all(isinstance(p, dict) for p in prompts):
        chats = [_chat(prompts)]  # one conversation as {role, content} messages
    else:
        chats = [_question(i, p) for i, p in enumerate(prompts)]

    tokens = body.get("tokens_to_generate", LEGACY_DEFAULT_TOKENS)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ApiError(400, "tokens_to_generate must be an integer greater than 0", param="tokens_to_generate",
                       code="invalid_value")
    if tokens > settings.max_tokens:
        raise limit_error("tokens_to_generate", tokens, "--max-tokens", settings.max_tokens,
                          param="tokens_to_generate", code="too_many_tokens")
    frames = body.get("max_num_frame", settings.max_frames)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ApiError(400, "max_num_frame must be an integer greater than 0", param="max_num_frame",
                       code="invalid_value")
    if frames > settings.max_frames:
        raise limit_error("max_num_frame", frames, "--max-frames", settings.max_frames, param="max_num_frame",
                          code="too_many_frames")

    text = "".join(t.content for turns in chats for t in turns)
    frames_mode = VIDEO_TAG in text and IMAGE_TAG not in text and not body.get("video_path_list")
    for key in ("image_path_list", "image_list", "video_path_list"):
        items = body.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ApiError(400, f"{key} must be a list", param=key, code="invalid_value")
        for j, item in enumerate(items):
            label = f"{key}[{j}]"
            if key == "video_path_list":
                media.add(VIDEO, item, label)
            elif frames_mode:
                url = f"data:image/png;base64,{item}" if key == "image_list" else item
                media.add_single_frame_video(url, label)
            elif key == "image_list":
                media.add_base64(IMAGE, item, label)
            else:
                media.add(IMAGE, item, label)

    requests = []
    for turns in chats:
        request = GenerationRequest(turns, images=list(media.images), videos=list(media.videos),
                                    sampling=SamplingParams(max_new_tokens=tokens), max_num_frame=frames,
                                    max_fps=settings.max_fps, max_seq_len=settings.max_seq_len)
        problems = request.problems()
        if problems:
            raise ApiError(400, "; ".join(problems), param="prompts", code="invalid_value")
        requests.append(request)
    return requests


def _question(i: int, prompt: Any) -> List[Turn]:
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"prompts[{i}] must be a non-empty string", param="prompts", code="invalid_value")
    return [Turn("user", prompt)]


def _chat(messages: List[Dict[str, Any]]) -> List[Turn]:
    turns = []
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ApiError(400, f"prompts[{i}] must be {{'role': system|user|assistant, 'content': str}}",
                           param="prompts", code="invalid_value")
        turns.append(Turn(m["role"], m["content"]))
    return turns


def legacy_answer(texts: List[str]) -> Dict[str, Any]:
    return {"text": list(texts)}
