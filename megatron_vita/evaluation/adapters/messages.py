"""What the evaluation harnesses hand a model, turned into this package's GenerationRequest.

Kept free of the harnesses' imports so it is tested here without them:

- `vlmevalkit_request(message, dataset, dataset_type)`: VLMEvalKit's message (a list of
  {type: text|image|video, value}) with the dataset-specific rewrites of Long-VITA's own
  VLMEvalKit wrapper (`VLMEvalKit/long_vita_hf.py`, `build_msgs`): texts concatenated, an
  image becomes "<image>\\n" and a video "<video>" where it stands, "\\nAnswer: " -> "\\n", then
  per dataset: MVBench drops "Only give the best option.Best option:(" and asks "Answer with
  the letter."; MMMU / MMStar and other MCQ drop "Please select the correct answer from the
  options above."; Video-MCQ adds "Offer a very short reply."; Y/N asks "Answer yes or no.";
  OCRBench, MathVista and the rest get their short-answer instruction. (Long-VITA also mapped
  Video-MME frames given as images to <video>; this adapter declares itself a video LLM, so
  VLMEvalKit hands it the video file instead.)
- `lmms_request(context, visuals, gen_kwargs)`: lmms-eval's generate_until arguments: the
  task's prompt text, the doc's visuals (video paths, frame directories, image paths or PIL
  images, which are written to `tmp_dir` as PNG because a Generator only opens local files),
  and gen_kwargs (max_new_tokens, temperature, top_p, do_sample, until). Visual tags go before
  the text unless the text already places one `<image>` per image (interleaved tasks).
- `cut_at_stops(text, until)`: lmms-eval's stop sequences applied to a finished answer.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_vita.inference.api import IMAGE_TAG, VIDEO_TAG, GenerationRequest, SamplingParams, Turn

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".flv", ".gif", ".mpg", ".mpeg", ".wmv")
_MCQ_SELECT = "Please select the correct answer from the options above."
_MMMU_SUFFIX = "Answer with the option's letter from the given choices directly."


def vlmevalkit_text(message: Sequence[Dict], dataset: Optional[str] = None,
                    dataset_type: Optional[str] = None) -> Tuple[str, List[str], List[str]]:
    """(text with tags, image paths, video paths) as Long-VITA's build_msgs made them."""
    text, images, videos = "", [], []
    for part in message:
        kind, value = part.get("type"), part.get("value")
        if kind == "text":
            text += str(value)
        elif kind == "image":
            images.append(str(value))
            text += IMAGE_TAG + "\n"
        elif kind == "video":
            videos.append(str(value))
            text += VIDEO_TAG
        else:
            raise ValueError(f"message part of type {kind!r}: Long-VITA takes text, image and video")
    text = text.replace("\nAnswer: ", "\n")
    if dataset == "OCRBench":
        text += "\nAnswer this question using the text in the image directly without any other context."
    elif dataset in ("MMMU_DEV_VAL", "MMMU_TEST", "MMStar"):
        text = text.replace(_MCQ_SELECT, "").strip() + "\n" + _MMMU_SUFFIX
    elif dataset == "MVBench":
        text = text.replace("Only give the best option.Best option:(", "") + "Answer with the letter."
    elif dataset == "MMVet":
        pass
    elif dataset == "MathVista_MINI":
        text += "\nAnswer the question using a single word or phrase."
    elif dataset is not None and dataset_type == "Y/N":
        text = text.replace("Answer the question with Yes or No.", "").strip() + "\n" + "Answer yes or no."
    elif dataset is not None and dataset_type == "MCQ":
        text = text.replace(_MCQ_SELECT, "").strip() + "\n" + "Answer with the letter."
    elif dataset is not None and dataset_type == "VQA":
        pass
    elif dataset is not None and dataset_type == "Video-MCQ":
        text += "Offer a very short reply."
    else:
        short = "Answer the question using a single word or phrase."
        text = text.replace(short, "").strip() + "\n" + short
    return text, images, videos


def vlmevalkit_request(message: Sequence[Dict], dataset: Optional[str] = None, dataset_type: Optional[str] = None,
                       sampling: Optional[SamplingParams] = None, max_num_frame: int = 4096,
                       max_fps: float = 1.0, max_seq_len: Optional[int] = None) -> GenerationRequest:
    text, images, videos = vlmevalkit_text(message, dataset, dataset_type)
    return _request(text, images, videos, sampling or SamplingParams(), max_num_frame, max_fps, max_seq_len)


def _request(text, images, videos, sampling, max_num_frame, max_fps, max_seq_len) -> GenerationRequest:
    # The request keeps images and videos apart, in tag order each (api.py); one user turn, as the
    # original's wrapper sent it.
    req = GenerationRequest([Turn("user", text)], images=list(images), videos=list(videos), sampling=sampling,
                            max_num_frame=max_num_frame, max_fps=max_fps, max_seq_len=max_seq_len)
    problems = req.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return req


def is_video_path(path: str) -> bool:
    return os.path.isdir(path) or path.lower().endswith(VIDEO_EXTENSIONS)


def sampling_from_gen_kwargs(gen_kwargs: Optional[Dict], default_max_new_tokens: int = 1024) -> SamplingParams:
    """lmms-eval's gen_kwargs -> SamplingParams (greedy unless do_sample with a temperature)."""
    g = dict(gen_kwargs or {})
    temperature = float(g.get("temperature") or 0.0)
    if not g.get("do_sample", temperature > 0):
        temperature = 0.0
    top_p = g.get("top_p")
    return SamplingParams(max_new_tokens=int(g.get("max_new_tokens") or default_max_new_tokens),
                          temperature=temperature, top_p=float(top_p) if top_p not in (None, 0) else 1.0)


def lmms_request(context: str, visuals: Sequence, gen_kwargs: Optional[Dict], tmp_dir: str,
                 max_num_frame: int = 4096, max_fps: float = 1.0, max_seq_len: Optional[int] = None,
                 default_max_new_tokens: int = 1024) -> GenerationRequest:
    images, videos = [], []
    for i, v in enumerate(_flatten(visuals)):
        if isinstance(v, str):
            if not os.path.exists(v):
                raise FileNotFoundError(f"visual {v} does not exist")
            (videos if is_video_path(v) else images).append(v)
        elif hasattr(v, "save"):  # a PIL image
            path = os.path.join(tmp_dir, f"visual_{i}.png")
            v.convert("RGB").save(path)
            images.append(path)
        else:
            raise ValueError(f"visual of type {type(v).__name__}: expected a file path or a PIL image")
    if isinstance(context, (list, tuple)):  # some lmms-eval versions hand a one-element list
        context = context[0] if context else ""
    text = context or ""
    # Interleaved tasks place their <image> markers; otherwise the media go first, videos then
    # images, as the original CLI's single-turn request does.
    if text.count(IMAGE_TAG) != len(images) or VIDEO_TAG in text:
        text = text.replace(IMAGE_TAG, "").replace(VIDEO_TAG, "")
        text = VIDEO_TAG * len(videos) + IMAGE_TAG * len(images) + ("\n" if images or videos else "") + text
    elif videos:
        text = VIDEO_TAG * len(videos) + "\n" + text
    return _request(text, images, videos, sampling_from_gen_kwargs(gen_kwargs, default_max_new_tokens),
                    max_num_frame, max_fps, max_seq_len)


def _flatten(visuals) -> List:
    out = []
    for v in visuals or []:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        elif v is not None:
            out.append(v)
    return out


def cut_at_stops(text: str, until) -> str:
    """The answer up to the first of lmms-eval's stop strings (`until`: a string or a list)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class HarnessModel:
    """The framework-free half of both adapters: options as the harnesses pass them (strings
    from lmms-eval's `--model_args k=v,...`), the Generator opened on first use, and one
    method per harness input. `generator` may be given directly (an already open one). Options
    are eval's flags: max_num_frame, max_fps, max_new_tokens, max_seq_len, tp / pp / vpp / cp,
    cp_algo, ulysses_degree_in_cp, tokenizer, dtype, backend, prefill_chunk and features (kernel
    flag names, a list or "use-flash-attn+use-fused-rmsnorm")."""

    def __init__(self, model_path: Optional[str] = None, max_num_frame=4096, max_fps=1.0, max_new_tokens=1024,
                 max_seq_len=None, tp=None, pp=None, vpp=None, cp=None, cp_algo=None, ulysses_degree_in_cp=None,
                 tokenizer: Optional[str] = None, dtype: str = "fp32", backend: Optional[str] = None,
                 prefill_chunk=None, features: Sequence[str] = (), generator=None):
        if generator is None and not model_path:
            raise ValueError("give the model directory (lmms-eval: --model_args pretrained=DIR; VLMEvalKit: "
                             "model_path=DIR)")
        self.model_path = model_path
        self.max_num_frame = int(max_num_frame)
        self.max_fps = float(max_fps)
        self.max_new_tokens = int(max_new_tokens)
        self.max_seq_len = _int_or_none(max_seq_len)
        # Layout flags stay None unless given: on an HF directory any of them is refused (as infer does).
        self._open = dict(tp=_int_or_none(tp), pp=_int_or_none(pp), vpp=_int_or_none(vpp), cp=_int_or_none(cp),
                          cp_algo=cp_algo, ulysses_degree_in_cp=_int_or_none(ulysses_degree_in_cp),
                          prefill_chunk=_int_or_none(prefill_chunk), tokenizer=tokenizer, dtype=dtype,
                          backend=backend,
                          features=tuple(features.split("+") if isinstance(features, str) else features))
        self._generator = generator

    @property
    def generator(self):
        if self._generator is None:
            from megatron_vita.evaluation.cli import open_generator

            self._generator = open_generator(self.model_path, **self._open)
        return self._generator

    def lmms_generate(self, context: str, visuals: Sequence, gen_kwargs: Optional[Dict]) -> str:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="long_vita_lmms_") as tmp:
            request = lmms_request(context, visuals, gen_kwargs, tmp, self.max_num_frame, self.max_fps,
                                   self.max_seq_len, self.max_new_tokens)
            text = self.generator.generate(request).text
        return cut_at_stops(text, (gen_kwargs or {}).get("until"))

    def vlmevalkit_generate(self, message: Sequence[Dict], dataset: Optional[str] = None,
                            dataset_type: Optional[str] = None) -> str:
        request = vlmevalkit_request(message, dataset, dataset_type,
                                     SamplingParams(max_new_tokens=self.max_new_tokens), self.max_num_frame,
                                     self.max_fps, self.max_seq_len)
        return self.generator.generate(request).text

    def close(self) -> None:
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()


def _int_or_none(value) -> Optional[int]:
    """lmms-eval's --model_args arrive as strings ("None" included)."""
    return None if value in (None, "", "None") else int(value)
