"""Dataset files and records: random access to Long-VITA JSONL and LLaVA JSON, record normalisation.

Owns reading one record of one dataset file by index, and turning it into a `Conversation`:

- Long-VITA JSONL: one object per line, `{"messages": [{"role", "content"}], "images": [...],
  "videos": [...]}` with `<image>` / `<video>` tags in the content.
- LLaVA JSON: one JSON array of `{"image": str|list, "video": ..., "conversations": [{"from":
  "human"|"gpt"|"system", "value"}]}`; it is converted once into a JSONL cache file. LLaVA-style
  records inside a JSONL file are accepted too; text-only records have no media keys.

Random access uses a byte-offset index of the non-blank lines, built by one vectorised scan and
cached on disk (keyed by path, size and mtime) so that 17M records are indexed once, not per
rank and run. Media paths resolve under the data root (or the dataset's media root); a path whose
real location (symlinks followed) lies outside it is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from megatron_vita.data.template import ROLE_ALIASES, SampleError

_CHUNK = 1 << 24
_OPEN_LOCK = threading.Lock()


def default_cache_dir() -> str:
    return os.environ.get("MEGATRON_VITA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megatron_vita"))


@dataclass
class Conversation:
    """A normalised record: (role, content) turns with roles user/assistant/system, media paths."""

    messages: List[Tuple[str, str]]
    images: List[str] = field(default_factory=list)
    videos: List[str] = field(default_factory=list)


def _scan_line_starts(path: str) -> np.ndarray:
    """[3, n] int64: byte offset, byte length and 1-based line number of every non-blank line."""
    starts = [np.zeros(1, dtype=np.int64)]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        base = 0
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10).astype(np.int64)
            starts.append(nl + base + 1)
            base += len(buf)
    all_starts = np.concatenate(starts)
    all_starts = all_starts[all_starts < size]
    ends = np.append(all_starts[1:], size)
    # A line of only "\n" or "\r\n" is blank; anything longer is a record (or a malformed one).
    keep = (ends - all_starts) > 2
    if np.any((ends - all_starts) == 2):
        with open(path, "rb") as f:
            for i in np.flatnonzero((ends - all_starts) == 2):
                f.seek(int(all_starts[i]))
                keep[i] = f.read(2) != b"\r\n"
    lines = np.arange(1, len(all_starts) + 1, dtype=np.int64)
    return np.stack([all_starts[keep], (ends - all_starts)[keep], lines[keep]])


def _cache_key(path: str) -> str:
    st = os.stat(path)
    h = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    return h


def _atomic_save(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def load_line_index(path: str, cache_dir: Optional[str] = None) -> np.ndarray:
    """The cached [3, n] line index of a JSONL file (built and saved on first use)."""
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, "index", _cache_key(path) + ".npy")
    if os.path.isfile(cached):
        try:
            return np.load(cached, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a torn or foreign file: rebuild it
    idx = _scan_line_starts(path)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        _atomic_save(cached, idx)
    except OSError:
        pass  # read-only cache: keep the index in memory
    return idx


def _llava_json_to_jsonl(path: str, cache_dir: Optional[str]) -> str:
    """Convert a LLaVA JSON array into a cached JSONL file (one record per line)."""
    cache_dir = cache_dir or default_cache_dir()
    out = os.path.join(cache_dir, "llava_jsonl", _cache_key(path) + ".jsonl")
    if os.path.isfile(out):
        return out
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid LLaVA JSON file (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA JSON file must hold a list of records, got {type(data).__name__}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in data:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def detect_format(path: str) -> str:
    """'llava_json' for a file holding one JSON array, else 'jsonl'."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "llava_json" if head.startswith(b"[") else "jsonl"


class RecordFile:
    """Random access to the records of one dataset file."""

    def __init__(self, path: str, fmt: str = "auto", cache_dir: Optional[str] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file not found: {path}")
        self.path = path
        self.format = detect_format(path) if fmt == "auto" else fmt
        self._read_path = _llava_json_to_jsonl(path, cache_dir) if self.format == "llava_json" else path
        self._index = load_line_index(self._read_path, cache_dir)
        self._fd = None
        self._pid = None

    def __len__(self) -> int:
        return int(self._index.shape[1])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"], d["_pid"] = None, None
        return d

    def location(self, k: int) -> str:
        """'file:line' (JSONL) or 'file record N' (LLaVA JSON) for messages."""
        if self.format == "llava_json":
            return f"{self.path} record {int(self._index[2, k])}"
        return f"{self.path}:{int(self._index[2, k])}"

    def read_text(self, k: int) -> str:
        # pread has no shared file position: safe for planner threads and forked workers alike.
        if self._fd is None or self._pid != os.getpid():
            with _OPEN_LOCK:
                if self._fd is None or self._pid != os.getpid():
                    self._fd = os.open(self._read_path, os.O_RDONLY)
                    self._pid = os.getpid()
        data = os.pread(self._fd, int(self._index[1, k]), int(self._index[0, k]))
        return data.decode("utf-8", errors="replace")

    def read(self, k: int) -> Any:
        try:
            # Without its line break, json's column is the column of the record's line.
            return json.loads(self.read_text(k).rstrip("\r\n"))
        except json.JSONDecodeError as e:
            # json's own wording ("Expecting value", "Unterminated string starting at") + the column.
            raise SampleError(f"malformed JSON: {e.msg}: column {e.colno}", "malformed_json") from None


def _media_list(obj: dict, plural: str, singular: str) -> List[str]:
    value = obj.get(plural, obj.get(singular))
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SampleError(f"'{plural}' must be a list of paths, got {value!r:.80}", "missing_fields")
    return list(value)


def normalize_record(obj: Any, require_answer: bool = True) -> Conversation:
    """A Long-VITA or LLaVA record as a Conversation; SampleError for malformed ones."""
    if not isinstance(obj, dict):
        raise SampleError(f"a record must be a JSON object, got {type(obj).__name__}", "malformed_json")
    turns = obj.get("messages")
    if turns is None:
        turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError("record has no 'messages' (or 'conversations') list", "missing_fields")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise SampleError(f"turn {i} is not an object", "missing_fields")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise SampleError(f"turn {i} needs a role in {sorted(ROLE_ALIASES)} and a text content, got "
                              f"role={role!r} content={type(content).__name__}", "missing_fields")
        messages.append((ROLE_ALIASES[role], content))
    if require_answer and not any(r == "assistant" for r, _ in messages):
        raise SampleError("record has no assistant turn (nothing to learn)", "missing_fields")
    return Conversation(messages, _media_list(obj, "images", "image"), _media_list(obj, "videos", "video"))


def resolve_media(path: str, base: str, allowed_roots: Sequence[str]) -> str:
    """The real path of a media file under `base`; SampleError when it lies outside every allowed root.

    Containment is decided on real paths (symlinks resolved in the file and in the roots), so a
    link inside the data root that points outside it is refused like `../outside.png`.
    The returned path is the resolved one: what is opened later is what was checked.
    """
    full = os.path.realpath(path if os.path.isabs(path) else os.path.join(base, path))
    for root in allowed_roots:
        if is_within(full, os.path.realpath(root)):
            return full
    raise SampleError(f"media path {path!r} escapes the data root (resolves to {full})", "path_escape")


def is_within(real_path: str, real_root: str) -> bool:
    """Whether an already resolved path is the root or lies below it."""
    return os.path.commonpath([real_path, real_root]) == real_root
