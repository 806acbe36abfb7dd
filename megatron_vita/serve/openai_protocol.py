"""OpenAI chat completions <-> GenerationRequest / GenerationResult.

Owns the wire format of `POST /v1/chat/completions`: which fields are read (and which are
refused rather than silently ignored), how `text` / `image_url` / `video_url` content parts
become one turn's text with an `<image>` / `<video>` tag per medium in order (the same layout
`infer` builds: media tags first, a newline, then the question; so the same question gets the
same answer from both), and the JSON of answers and streamed chunks.

Sampling: greedy unless `temperature > 0` (OpenAI's client sends no temperature unless asked, so
a plain request answers like `infer`). `top_k`, `repetition_penalty` and `max_num_frame` are
accepted as extensions (the openai client's `extra_body`).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from megatron_vita.inference.api import IMAGE_TAG, VIDEO_TAG, GenerationRequest, GenerationResult, SamplingParams, Turn
from megatron_vita.serve.media import IMAGE, VIDEO, RequestMedia
from megatron_vita.serve.settings import ApiError, ServeSettings, limit_error

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields with a meaning this server does not implement: refused by name instead of ignored.
_UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logprobs": False,
                "top_logprobs": None, "logit_bias": None, "stop": None, "audio": None, "prediction": None}
_ZERO_PENALTIES = ("frequency_penalty", "presence_penalty")


def _number(body: Dict[str, Any], name: str, kind, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"{name} must be a number" if kind is not int else f"{name} must be an integer",
                       param=name, code="invalid_value")
    return value


def parse_chat_request(body: Any, settings: ServeSettings, media: RequestMedia) -> Tuple[GenerationRequest, bool, bool]:
    """(request, stream, include_usage) from a chat-completions body; media land in `media`.
    Raises ApiError naming the field or limit at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in (None, neutral, [], ""):
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    for name in _ZERO_PENALTIES:
        if _number(body, name, (int, float), 0) != 0:
            raise ApiError(400, f"{name} is not supported (use repetition_penalty)", param=name,
                           code="unsupported_parameter")
    if _number(body, "n", int, 1) != 1:
        raise ApiError(400, "n must be 1: one answer per request", param="n", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "response_format other than text is not supported", param="response_format",
                       code="unsupported_parameter")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = settings.max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{param} must be an integer >= 1", param=param, code="invalid_value")
    elif max_tokens > settings.max_tokens:
        raise limit_error(param, max_tokens, "--max-tokens", settings.max_tokens, param=param, code="too_many_tokens")
    frames = _number(body, "max_num_frame", int, settings.max_frames)
    if frames > settings.max_frames:
        raise limit_error("max_num_frame", frames, "--max-frames", settings.max_frames, param="max_num_frame",
                          code="too_many_frames")
    seed = _number(body, "seed", int, None)
    sampling = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(_number(body, "temperature", (int, float), 0.0)),
        top_p=float(_number(body, "top_p", (int, float), 1.0)),
        top_k=_number(body, "top_k", int, 0),
        repetition_penalty=float(_number(body, "repetition_penalty", (int, float), 1.0)),
        seed=seed)

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
    turns = [_turn(i, m, media) for i, m in enumerate(messages)]
    request = GenerationRequest(turns, images=list(media.images), videos=list(media.videos), sampling=sampling,
                                max_num_frame=frames, max_fps=settings.max_fps, max_seq_len=settings.max_seq_len)
    problems = request.problems()
    if problems:
        raise ApiError(400, "; ".join(problems), param="messages", code="invalid_value")
    stream = body.get("stream") is True
    options = body.get("stream_options") or {}
    return request, stream, bool(isinstance(options, dict) and options.get("include_usage"))


def _turn(i: int, message: Any, media: RequestMedia) -> Turn:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object with role and content", param=where, code="invalid_value")
    role = _ROLES.get(message.get("role"))
    if role is None:
        raise ApiError(400, f"{where}.role {message.get('role')!r} is not one of {', '.join(_ROLES)}",
                       param=f"{where}.role", code="invalid_value")
    content = message.get("content")
    if content is None and role == "assistant":
        return Turn(role, "")
    if isinstance(content, str):
        return Turn(role, content)
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content",
                       code="invalid_value")
    return Turn(role, _join_parts(where, content, media, role))


def _join_parts(where: str, parts: List[Any], media: RequestMedia, role: str) -> str:
    """Text parts joined by newlines; each media part becomes its tag at its place, and a run of
    media tags is separated from the text after it by one newline (as `infer` lays out
    `<video><image>\\nquestion`)."""
    text = ""
    for j, part in enumerate(parts):
        label = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise ApiError(400, f"{label}.text must be a string", param=label, code="invalid_value")
            text += ("\n" if text else "") + piece
        elif kind in ("image_url", "video_url"):
            if role != "user":
                raise ApiError(400, f"{label}: media are accepted in user messages only", param=label,
                               code="invalid_value")
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            media.add(IMAGE if kind == "image_url" else VIDEO, url, label)
            text += IMAGE_TAG if kind == "image_url" else VIDEO_TAG
        else:
            raise ApiError(400, f"{label}: content part type {kind!r} is not supported (text, image_url, "
                           "video_url)", param=label, code="unsupported_content")
    return text


# -- answers -----------------------------------------------------------------------------------

class Completion:
    """The ids and timestamps shared by an answer's JSON or by all the chunks of one stream."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> Dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def answer(self, result: GenerationResult) -> Dict[str, Any]:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": usage(result)}

    def chunk(self, delta: Dict[str, Any], finish_reason: Optional[str] = None) -> Dict[str, Any]:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, result: GenerationResult) -> Dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(result)}


def usage(result: GenerationResult) -> Dict[str, int]:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}
