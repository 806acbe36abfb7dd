"""Opening a checkpoint of any kind as a tensor source: format detection and the checks on opening.

`megatron_format_of` tells a megatron-core dist checkpoint (torch_dist) from Megatron's legacy
rank files; `open_source` returns the matching reader (HFSource, DistSource or LegacySource)
with its names and shapes checked against the model config, so a broken checkpoint is one
error naming the file before anything is written or any rank starts. `convert`, `verify` and
`model_io` all open checkpoints here. `config_differences` is the one way two model configs are
compared (a checkpoint's stored config against `--model`, or the two sides of a verify).
"""
from __future__ import annotations

import os
from typing import List, Optional

from megatron_vita.config.model import ModelConfig


def megatron_format_of(path: str) -> str:
    """'torch_dist' or 'legacy' for a Megatron save root or iteration directory."""
    from megatron_vita.checkpoint.megatron_layout import parse_rank_dir, resolve_iteration_dir

    iter_dir, _ = resolve_iteration_dir(path)
    if os.path.isfile(os.path.join(iter_dir, ".metadata")):
        return "torch_dist"
    if any(parse_rank_dir(n) for n in os.listdir(iter_dir)):
        return "legacy"
    raise FileNotFoundError(f"{iter_dir} holds neither a torch_dist checkpoint (.metadata) nor mp_rank_* directories")


def config_differences(a: ModelConfig, b: ModelConfig, a_name: str = "", b_name: str = "") -> List[str]:
    """'key: <a_name> A vs <b_name> B' for every config.json key where two model configs differ.

    `torch_dtype` is not compared: a cast of the same weights is the same model.
    """
    x, y = a.to_hf_dict(), b.to_hf_dict()
    a_name, b_name = (a_name + " ") if a_name else "", (b_name + " ") if b_name else ""
    return [f"{k}: {a_name}{x.get(k)!r} vs {b_name}{y.get(k)!r}" for k in sorted(set(x) | set(y))
            if x.get(k) != y.get(k) and k != "torch_dtype"]


def _check_model(where: str, found: ModelConfig, given: ModelConfig) -> None:
    diffs = config_differences(found, given, "checkpoint", "--model")
    if diffs:
        raise ValueError(f"config mismatch between {where} and --model:\n  " + "\n  ".join(diffs))


def open_source(kind: str, path: str, model: Optional[str] = None):
    """A conversion source: HFSource, LegacySource or DistSource, its names/shapes checked.

    `model` is a config spec (preset, HF directory or config JSON) for Megatron checkpoints
    that carry none (released MindSpeed / TE weights); when the checkpoint carries one, the two
    must describe the same model.
    """
    from megatron_vita.checkpoint.hf_format import HFSource, model_shapes

    given = None
    if model is not None:
        from megatron_vita.config.model import resolve_model_config

        given = resolve_model_config(model)
    if kind == "hf":
        src = HFSource(path)
        if given is not None:
            _check_model(f"{path}/config.json", src.cfg, given)
        src.check()
        return src
    if kind != "megatron":
        raise ValueError(f"--from {kind!r}: use hf or megatron")
    if megatron_format_of(path) == "torch_dist":
        from megatron_vita.checkpoint.dist_format import DistSource as cls
    else:
        from megatron_vita.checkpoint.legacy_format import LegacySource as cls
    src = cls(path, given)
    if given is not None and src.stored_cfg is not None:
        _check_model(f"the model_config stored in {path}", src.stored_cfg, given)
    _, full_shapes = model_shapes(src.cfg)
    src.check(full_shapes)
    return src
