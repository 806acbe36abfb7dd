"""The server's limits and media policy (`ServeSettings`), and the one error type every refusal
raises (`ApiError`), rendered in OpenAI's error shape.

Every limit a request can exceed is named here with the flag that sets it, so a refused request
says which flag to raise, and the whole set is checked before the model is loaded (one line per
problem, like every other command).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

# The original Megatron server's default answer length ("hopefully sane"), used by PUT /api.
LEGACY_DEFAULT_TOKENS = 64
# The original HF script's max_new_tokens, the default --max-tokens.
DEFAULT_MAX_TOKENS = 1024
# The original's max_num_frame, the default --max-frames.
DEFAULT_MAX_FRAMES = 4096


@dataclass
class ServeSettings:
    """What `megatron-vita serve` accepts. Sizes in bytes; counts per request."""

    model_name: str
    media_root: Optional[str] = None  # local paths / file:// URLs only under this directory
    allow_remote_media: bool = False  # http(s) URLs are fetched only when set
    max_request_bytes: int = 64 << 20  # body, and each fetched remote medium
    max_images: int = 16
    max_videos: int = 4
    max_frames: int = DEFAULT_MAX_FRAMES  # frames sampled per video (a request may ask fewer)
    max_tokens: int = DEFAULT_MAX_TOKENS  # new tokens per answer (the default when not asked)
    max_concurrency: int = 64  # requests held at once, generating or waiting (FIFO)
    max_seq_len: Optional[int] = None  # prompt + answer tokens, passed to every request
    max_fps: float = 1.0
    remote_timeout_s: float = 30.0

    def problems(self) -> List[str]:
        """One line per bad setting, naming its flag."""
        out = []
        if self.media_root is not None and not os.path.isdir(self.media_root):
            out.append(f"--media-root {self.media_root} is not a directory")
        if self.max_request_bytes < 1024:
            out.append(f"--max-request-mb must allow at least 1 KiB, got {self.max_request_bytes} bytes")
        for flag, value in (("--max-images", self.max_images), ("--max-videos", self.max_videos)):
            if value < 0:
                out.append(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--max-frames", self.max_frames), ("--max-tokens", self.max_tokens),
                            ("--max-concurrency", self.max_concurrency)):
            if value < 1:
                out.append(f"{flag} must be >= 1, got {value}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            out.append(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if not self.model_name:
            out.append("--served-model-name must not be empty")
        return out


class ApiError(Exception):
    """A refused request: HTTP status plus OpenAI's error fields (`type`, `param`, `code`)."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> Dict[str, Any]:
        """OpenAI's error object. `message` is repeated at the top level because the original
        Long-VITA client (VLMEvalKit's LongVITAWrapper) prints `response.json()['message']`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                "message": self.message}


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def limit_error(what: str, got: int, flag: str, limit: int, *, param: str, code: str, status: int = 400) -> ApiError:
    """A request over one of the server's limits: the message names the flag that sets it."""
    return ApiError(status, f"{what}: {got} exceeds the server's limit {flag} {limit}", param=param, code=code)
