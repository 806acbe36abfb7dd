"""The types every inference path shares: a request, its sampling options, its result, and the
`Generator` protocol the HF path, the megatron-core engine, `infer`, `serve` and `eval` meet at.

A request is a chat: turns whose text holds one `<image>` / `<video>` tag per medium, in order,
exactly like a training record, plus the media themselves as local files. `to_record()` turns it
into the record format the data pipeline reads, so the prompt of a request is built by the same
code as a training sample (ChatML, image tiling, video frame sampling): train and infer cannot
drift. Whoever accepts media from outside (the server's `data:` URLs, `--media-root`) writes or
checks the files before a request is made; a Generator only ever opens local paths.

Generators are backend-agnostic: the HF path (transformers' `generate` with its KV cache) and the
megatron-core engine (TP/PP/CP ranks with a distributed KV cache) both implement `generate` and
`stream`, and greedy decoding gives the same tokens on both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Protocol, Sequence, runtime_checkable

ROLES = ("system", "user", "assistant")
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


@dataclass
class SamplingParams:
    """How the next token is chosen. Greedy unless `temperature > 0`."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    seed: Optional[int] = None  # sampling only; None draws from the process generator

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def problems(self) -> List[str]:
        """One line per bad value (flag names as `infer` spells them)."""
        out = []
        if self.max_new_tokens < 1:
            out.append(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            out.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"--top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            out.append(f"--repetition_penalty must be > 0, got {self.repetition_penalty}")
        return out


@dataclass
class Turn:
    role: str  # system | user | assistant
    content: str  # text with one <image> / <video> tag per medium of this turn, in order


@dataclass
class GenerationRequest:
    """One chat to continue: the turns (the last one the user's), the media their tags refer to
    (local files, in tag order over the whole chat), and the limits that shape the prompt."""

    turns: List[Turn]
    images: List[str] = field(default_factory=list)
    videos: List[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_num_frame: int = 4096  # frames sampled per video, at <= max_fps
    max_fps: float = 1.0
    max_seq_len: Optional[int] = None  # prompt + answer tokens; None: the model's limit

    def to_record(self) -> dict:
        """The request as a training-format record (messages + images + videos)."""
        return {"messages": [{"role": t.role, "content": t.content} for t in self.turns],
                "images": list(self.images), "videos": list(self.videos)}

    def problems(self) -> List[str]:
        """One line per malformed part, before any model work."""
        out = list(self.sampling.problems())
        if not self.turns:
            out.append("the request has no turns")
        for i, t in enumerate(self.turns):
            if t.role not in ROLES:
                out.append(f"turn {i}: role {t.role!r} is not one of {', '.join(ROLES)}")
        if self.turns and self.turns[-1].role == "assistant":
            out.append("the last turn is the assistant's: nothing to answer")
        text = "".join(t.content for t in self.turns)
        for tag, media in ((IMAGE_TAG, self.images), (VIDEO_TAG, self.videos)):
            if text.count(tag) != len(media):
                out.append(f"{text.count(tag)} {tag} tags in the turns but {len(media)} "
                           f"{'images' if tag == IMAGE_TAG else 'videos'} given")
        if self.max_num_frame < 1:
            out.append(f"--max_num_frame must be >= 1, got {self.max_num_frame}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            out.append(f"--max_seq_len must be >= 2, got {self.max_seq_len}")
        return out


def single_turn(question: str, images: Sequence[str] = (), videos: Sequence[str] = (), **kwargs) -> GenerationRequest:
    """The original CLI's request: the media first (videos, then images), then the question,
    unless the question already places them with its own tags."""
    text = question
    if IMAGE_TAG not in question and VIDEO_TAG not in question:
        text = VIDEO_TAG * len(videos) + IMAGE_TAG * len(images) + ("\n" if (images or videos) else "") + question
    return GenerationRequest([Turn("user", text)], images=list(images), videos=list(videos), **kwargs)


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    finish_reason: str  # "stop" (an end token) | "length" (max_new_tokens or max_seq_len)
    prompt_tokens: int


@runtime_checkable
class Generator(Protocol):
    """What `infer`, `serve` and `eval` drive: one request at a time."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole answer."""

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """The answer as text pieces, as they are decoded; joined they equal generate().text.
        Exhausted, the iterator returns (StopIteration.value) the GenerationResult generate()
        would give, so a caller that streams also gets the finish reason and token counts, and
        closing it early stops the generation (the server cancels that way)."""
