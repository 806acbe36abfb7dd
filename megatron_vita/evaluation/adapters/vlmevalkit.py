"""The VLMEvalKit model: `vlmeval.vlm.base.BaseModel` over a Long-VITA Generator.

VLMEvalKit calls `model.generate(message, dataset)`, which checks the message and calls
`generate_inner(message, dataset)`; `message` is a list of {type: text|image|video, value}.
Declared INTERLEAVE and VIDEO_LLM (as Long-VITA's own wrapper, `VLMEvalKit/long_vita_hf.py`):
video datasets pass the video file, which the Generator samples at <= 1 fps and <=
max_num_frame frames (VLMEvalKit's --nframe does not reach a video LLM; set max_num_frame).
The prompt rewrites per dataset are Long-VITA's (`messages.vlmevalkit_text`).

`LongVITA` is built on first access because BaseModel lives in VLMEvalKit; `register(name,
**kwargs)` adds a configured entry to `vlmeval.config.supported_VLM`.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from megatron_vita.evaluation.adapters.messages import HarnessModel

_BUILT = {}


def _dataset_type(dataset):
    if dataset is None:
        return None
    from vlmeval.dataset import DATASET_TYPE

    return DATASET_TYPE(dataset)


def _build():
    from vlmeval.vlm.base import BaseModel

    class LongVITA(BaseModel):
        """Long-VITA (HF directory or Megatron checkpoint) for VLMEvalKit."""

        INTERLEAVE = True
        VIDEO_LLM = True
        allowed_types = ["text", "image", "video"]
        is_api = False

        def __init__(self, model_path: str, **kwargs: Any) -> None:
            self.model = HarnessModel(model_path, **kwargs)

        def generate_inner(self, message, dataset=None) -> str:
            return self.model.vlmevalkit_generate(message, dataset, _dataset_type(dataset))

    return LongVITA


def register(name: str = "LongVITA", **kwargs: Any):
    """Make `name` a VLMEvalKit model (run.py --model NAME) built with these options."""
    from vlmeval.config import supported_VLM

    supported_VLM[name] = partial(__getattr__("LongVITA"), **kwargs)
    return supported_VLM[name]


def __getattr__(name: str):
    if name == "LongVITA":
        if "cls" not in _BUILT:
            _BUILT["cls"] = _build()
        return _BUILT["cls"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
