"""Stage recipes: typed YAML loading and validation that names the offending recipe line.

Owns the schema of `data_recipes/*.yaml`: the per-stage settings (sequence length, tiling grid,
video frames, packing mode, bad-sample policy, model preset, tokenizer) and the data mixture
(group, JSONL path under the data root, ratio, cap), as listed in
shared/reference/data_mixtures.tsv. A `training:` mapping is carried through untouched for the
training stack, which owns its keys; everything else is validated strictly: an unknown key, a
wrong type, an impossible value or (with a data root) a missing file is a ValueError of the form
`recipe.yaml:LINE: key: what was expected`.

Selection rule per dataset (the released one): shuffle the file's N records with the seed, take
used = min(int(ratio * N), cap) of them, index k -> permutation[k % N] (ratio > 1 repeats).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import yaml

PACKING_MODES = ("per_source", "shared", "none")
# Shortest packed sequence accepted: below it not even a one-word text exchange fits the chat template.
MIN_SEQ_LENGTH = 16
OVERSIZE_POLICIES = ("drop", "truncate", "fewer_frames")
FORMATS = ("auto", "jsonl", "llava_json")


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line of every key (1-based)."""


class LineDict(dict):
    line: int = 0
    key_lines: Dict[str, int]


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:  # PyYAML would silently keep the last one
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class DatasetEntry:
    """One JSONL (or LLaVA JSON) file of the mixture."""

    group: str
    path: str
    ratio: float = 1.0
    cap: Optional[int] = None
    format: str = "auto"
    # Media paths in the records are relative to this folder (under the data root); default: the root.
    media_root: Optional[str] = None
    line: int = 0  # recipe line, for messages

    @property
    def enabled(self) -> bool:
        return self.ratio > 0 and (self.cap is None or self.cap > 0)


@dataclass
class ImageSettings:
    max_tiles: int = 12
    min_tiles: int = 1
    max_pixels: int = 8192 * 8192


@dataclass
class VideoSettings:
    max_frames: int = 128
    max_fps: float = 1.0
    # Frame directories carry no frame rate: they are sampled as a video at this rate.
    frame_dir_fps: float = 1.0


@dataclass
class PackingSettings:
    # per_source: one buffer per dataset file (stages 1-2); shared: `buffers` buffers for all
    # datasets (stages 3-4); none: one sample per sequence.
    mode: str = "per_source"
    # Reset position ids and attention (cu_seqlens) at every document boundary.
    reset: bool = True
    buffers: int = 2
    # Samples longer than seq_length: drop | truncate (cut at a tile boundary) | fewer_frames
    # (resample videos with fewer frames so the sample fits; otherwise drop).
    oversize: str = "drop"


@dataclass
class BadSampleSettings:
    # Stop the run when bad / seen exceeds this, once at least `min_samples` were seen.
    max_fraction: float = 0.01
    min_samples: int = 1000
    report_first: int = 5


@dataclass
class Recipe:
    name: str
    stage: int
    seq_length: int
    datasets: List[DatasetEntry]
    model: str = "long-vita-14b"
    tokenizer: Optional[str] = None
    image: ImageSettings = field(default_factory=ImageSettings)
    video: VideoSettings = field(default_factory=VideoSettings)
    packing: PackingSettings = field(default_factory=PackingSettings)
    bad_samples: BadSampleSettings = field(default_factory=BadSampleSettings)
    # Free-form: keys defined and validated by the training stack.
    training: Dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def enabled_datasets(self) -> List[DatasetEntry]:
        return [d for d in self.datasets if d.enabled]

    def resolve(self, data_root: str, rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.join(data_root, rel)


class _Checker:
    """Collects typed values from a LineDict and reports errors with file:line."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, line: int, where: str, msg: str):
        raise ValueError(f"{self.path}:{line}: {where}: {msg}")

    def section(self, d: Any, cls, where: str, line: int, skip=(), exclude=("line",)):
        if not isinstance(d, dict):
            self.fail(line, where, f"expected a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - set(exclude)
        lines = getattr(d, "key_lines", {})
        for k in d:
            if k not in known:
                self.fail(lines.get(k, line), f"{where}.{k}" if where else str(k),
                          f"unknown key (expected one of {sorted(known)})")
        out = {}
        for f in fields(cls):
            if f.name in d and f.name not in skip:
                out[f.name] = self.value(d[f.name], f.type, f"{where}.{f.name}" if where else f.name,
                                         lines.get(f.name, line))
        return out

    def value(self, v: Any, typ: str, where: str, line: int):
        typ = str(typ).replace("typing.", "")
        optional = typ.startswith("Optional[")
        base = typ[len("Optional["):-1] if optional else typ
        if v is None:
            if optional:
                return None
            self.fail(line, where, f"expected {base}, got null")
        if base == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                self.fail(line, where, f"expected an integer, got {v!r}")
        elif base == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.fail(line, where, f"expected a number, got {v!r}")
            v = float(v)
        elif base == "bool":
            if not isinstance(v, bool):
                self.fail(line, where, f"expected true or false, got {v!r}")
        elif base == "str":
            if not isinstance(v, str) or not v:
                self.fail(line, where, f"expected a non-empty string, got {v!r}")
        return v

    def check(self, ok: bool, line: int, where: str, msg: str):
        if not ok:
            self.fail(line, where, msg)


def _line(d, key, default):
    return getattr(d, "key_lines", {}).get(key, default)


def parse_recipe(doc: Any, path: str = "<recipe>") -> Recipe:
    """Build and validate a Recipe from a YAML document loaded with line numbers."""
    c = _Checker(path)
    if not isinstance(doc, dict):
        c.fail(1, "recipe", "expected a mapping at the top level")
    top = c.section(doc, Recipe, "", 1, skip=("datasets", "image", "video", "packing", "bad_samples", "training"),
                    exclude=("path",))
    for req in ("name", "stage", "seq_length"):
        c.check(req in top, 1, req, "required key is missing")
    subs = {}
    for key, cls in (("image", ImageSettings), ("video", VideoSettings), ("packing", PackingSettings),
                     ("bad_samples", BadSampleSettings)):
        subs[key] = cls(**c.section(doc.get(key, {}), cls, key, _line(doc, key, 1))) if key in doc else cls()
    training = doc.get("training", {})
    if training is None:
        training = {}
    c.check(isinstance(training, dict), _line(doc, "training", 1), "training", "expected a mapping")
    c.check("datasets" in doc, 1, "datasets", "required key is missing")
    raw = doc["datasets"]
    c.check(isinstance(raw, list) and len(raw) > 0, _line(doc, "datasets", 1), "datasets",
            "expected a non-empty list of {group, path, ratio[, cap]}")
    datasets = []
    for i, d in enumerate(raw):
        line = getattr(d, "line", _line(doc, "datasets", 1))
        vals = c.section(d, DatasetEntry, f"datasets[{i}]", line)
        for req in ("group", "path"):
            c.check(req in vals, line, f"datasets[{i}].{req}", "required key is missing")
        datasets.append(DatasetEntry(**vals, line=line))
    # Kept as parsed: its per-key line numbers let the training stack name the offending line.
    recipe = Recipe(**top, datasets=datasets, training=training, path=path, **subs)
    _validate_values(recipe, doc, c)
    return recipe


def _validate_values(r: Recipe, doc, c: _Checker) -> None:
    def L(key, sub=None):
        return _line(doc.get(sub) or {}, key, _line(doc, sub, 1)) if sub else _line(doc, key, 1)

    c.check(r.stage in (0, 1, 2, 3, 4), L("stage"), "stage", f"expected 1..4 (0 for the demo), got {r.stage}")
    c.check(r.seq_length >= MIN_SEQ_LENGTH, L("seq_length"), "seq_length",
            f"expected >= {MIN_SEQ_LENGTH} tokens, got {r.seq_length}")
    im, vd, pk, bd = r.image, r.video, r.packing, r.bad_samples
    c.check(1 <= im.min_tiles <= im.max_tiles <= 64, L("max_tiles", "image"), "image.max_tiles",
            f"need 1 <= min_tiles <= max_tiles <= 64, got {im.min_tiles}..{im.max_tiles}")
    c.check(im.max_pixels > 0, L("max_pixels", "image"), "image.max_pixels", "expected > 0")
    c.check(vd.max_frames >= 1, L("max_frames", "video"), "video.max_frames", f"expected >= 1, got {vd.max_frames}")
    c.check(vd.max_fps > 0, L("max_fps", "video"), "video.max_fps", f"expected > 0, got {vd.max_fps}")
    c.check(vd.frame_dir_fps > 0, L("frame_dir_fps", "video"), "video.frame_dir_fps", "expected > 0")
    c.check(pk.mode in PACKING_MODES, L("mode", "packing"), "packing.mode",
            f"expected one of {PACKING_MODES}, got {pk.mode!r}")
    c.check(pk.oversize in OVERSIZE_POLICIES, L("oversize", "packing"), "packing.oversize",
            f"expected one of {OVERSIZE_POLICIES}, got {pk.oversize!r}")
    c.check(pk.buffers >= 1, L("buffers", "packing"), "packing.buffers", f"expected >= 1, got {pk.buffers}")
    c.check(0.0 <= bd.max_fraction <= 1.0, L("max_fraction", "bad_samples"), "bad_samples.max_fraction",
            f"expected a fraction in [0, 1], got {bd.max_fraction}")
    c.check(bd.min_samples >= 0 and bd.report_first >= 0, L("min_samples", "bad_samples"), "bad_samples",
            "min_samples and report_first must be >= 0")
    seen = {}
    for i, d in enumerate(r.datasets):
        where = f"datasets[{i}]"
        c.check(d.ratio >= 0, d.line, f"{where}.ratio", f"expected a ratio >= 0, got {d.ratio}")
        c.check(d.cap is None or d.cap >= 0, d.line, f"{where}.cap", f"expected a count >= 0, got {d.cap}")
        c.check(d.format in FORMATS, d.line, f"{where}.format", f"expected one of {FORMATS}, got {d.format!r}")
        c.check(d.path not in seen, d.line, f"{where}.path",
                f"{d.path} is listed twice (first on line {seen.get(d.path)})")
        seen[d.path] = d.line
    c.check(any(d.enabled for d in r.datasets), L("datasets"), "datasets", "no dataset has ratio > 0")


def check_seq_length(n: int, where: str = "--seq-length") -> int:
    """The bound a recipe's seq_length obeys, for a value from elsewhere (a flag): ValueError naming `where`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < MIN_SEQ_LENGTH:
        raise ValueError(f"{where}: expected an integer >= {MIN_SEQ_LENGTH} tokens, got {n!r}")
    return n


def load_recipe(path: str, data_root: Optional[str] = None) -> Recipe:
    """Load and validate a recipe; with `data_root`, every enabled dataset file must exist there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.load(f, Loader=_LineLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            raise ValueError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    recipe = parse_recipe(doc, path)
    if data_root is not None:
        check_files(recipe, data_root)
    return recipe


def check_files(recipe: Recipe, data_root: str) -> None:
    """Every enabled dataset file (and media root) must exist under the data root."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root {data_root} is not a directory")
    for i, d in enumerate(recipe.datasets):
        if not d.enabled:
            continue
        full = recipe.resolve(data_root, d.path)
        if not os.path.isfile(full):
            raise ValueError(f"{recipe.path}:{d.line}: datasets[{i}].path: file not found: {full}")
        if d.media_root is not None and not os.path.isdir(recipe.resolve(data_root, d.media_root)):
            raise ValueError(f"{recipe.path}:{d.line}: datasets[{i}].media_root: not a directory under "
                             f"{data_root}: {d.media_root}")


def recipe_dir() -> str:
    """The repository's data_recipes/ folder (next to the package)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data_recipes")
