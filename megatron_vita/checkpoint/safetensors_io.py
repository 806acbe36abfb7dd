"""Stream safetensors files with plain positioned reads and writes (no memory map).

The safetensors format is an 8-byte little-endian header length, a JSON header
(`name -> {dtype, shape, data_offsets}` plus an optional `__metadata__`), then the raw tensor
bytes. Reading a tensor, or a range of its rows, is one `pread` into a fresh tensor's memory;
writing a shard lays out the whole header first (the converter knows every name, shape and
dtype before it reads any data) and then writes each tensor at its offset as it arrives.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a conversion touches
stays resident (and counted in the process RSS) until the handle closes, so RSS grows with the
shard rather than with the tensor. Plain reads keep peak memory at the tensors in flight.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

DTYPE_TO_ST = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
# Above this, a header is not a safetensors header but a corrupt or foreign file.
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def new_file_mode() -> int:
    """The permission bits open() gives a new file in this process: 0o666 less the umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux: read it by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def read_header(path: str) -> Tuple[Dict[str, TensorEntry], Dict[str, str]]:
    """The tensors of a safetensors file (absolute offsets) and its `__metadata__`."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: header length {n} is not plausible; not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    size = os.path.getsize(path)
    entries = {}
    for name, info in header.items():
        if info.get("dtype") not in ST_TO_DTYPE:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')!r}")
        b, e = info["data_offsets"]
        entry = TensorEntry(ST_TO_DTYPE[info["dtype"]], tuple(info["shape"]), 8 + n + b, 8 + n + e)
        expected = _numel(entry.shape) * _itemsize(entry.dtype)
        if entry.nbytes != expected or entry.end > size:
            raise ValueError(f"{path}: tensor '{name}' of shape {list(entry.shape)} has a byte range "
                             f"[{b}, {e}) that does not fit its shape or the file ({size} bytes)")
        entries[name] = entry
    return entries, metadata


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_into(fd: int, out: torch.Tensor, offset: int, path: str) -> None:
    """Fill `out` (contiguous) with the bytes at `offset` of the open file."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"{path}: unexpected end of file at byte {offset + done}")
        done += got


class SafetensorsFile:
    """Read tensors (or row ranges of them) from one safetensors file."""

    def __init__(self, path: str):
        self.path = path
        self.entries, self.metadata = read_header(path)
        self._fd: Optional[int] = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The tensor `name`, or rows [start, stop) of its first dimension."""
        e = self.entries[name]
        shape = list(e.shape)
        if rows is not None and shape:
            shape[0] = rows[1] - rows[0]
        out = torch.empty(shape, dtype=e.dtype)
        self.read_into(name, out, rows)
        return out

    def read_into(self, name: str, out: torch.Tensor, rows: Optional[Tuple[int, int]] = None) -> None:
        """Fill the contiguous tensor `out` with `name` (or its rows [start, stop))."""
        e = self.entries[name]
        begin, shape = e.begin, list(e.shape)
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"{self.path}: rows {rows} out of range for '{name}' of shape {list(e.shape)}")
            begin += start * _numel(shape[1:]) * _itemsize(e.dtype)
            shape[0] = stop - start
        if out.dtype != e.dtype or list(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"{self.path}: cannot read '{name}' {shape} {e.dtype} into {list(out.shape)} {out.dtype}")
        if out.numel():
            _read_into(self._file(), out, begin, self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SafetensorsWriter:
    """Write one safetensors file whose tensor list is known up front.

    `plan` is (name, dtype, shape) in file order. The header is written on creation; `write`
    places each tensor's bytes at its offset, in any order; `close` checks every tensor came.
    """

    def __init__(self, path: str, plan: Iterable[Tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = path
        header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._spans: Dict[str, Tuple[int, int, torch.dtype, Tuple[int, ...]]] = {}
        for name, dtype, shape in plan:
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._spans[name] = (offset, offset + nbytes, dtype, tuple(shape))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._base = 8 + len(raw)
        # 0o666 like open(): the umask decides, as for the config files written beside it.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self._base + offset)
        # rows still to come per tensor (a tensor may arrive in runs of rows)
        self._pending = {name: (shape[0] if shape else 1) for name, (_, _, _, shape) in self._spans.items()}
        self.nbytes = self._base + offset

    def names(self) -> List[str]:
        return list(self._spans)

    def write(self, name: str, tensor: torch.Tensor, row_offset: int = 0) -> None:
        """Write `tensor` as `name`, or as rows starting at `row_offset` of `name`."""
        begin, end, dtype, shape = self._spans[name]
        if tensor.dtype != dtype:
            raise ValueError(f"{self.path}: '{name}' planned as {dtype}, got {tensor.dtype}")
        if tuple(tensor.shape[1:]) != shape[1:] or row_offset + (tensor.shape[0] if tensor.dim() else 1) > (
                shape[0] if shape else 1) or (not shape and tensor.dim()):
            raise ValueError(f"{self.path}: '{name}' planned with shape {list(shape)}, got rows "
                             f"{row_offset}+{list(tensor.shape)}")
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        row_bytes = _numel(shape[1:]) * _itemsize(dtype) if shape else 0
        at = self._base + begin + row_offset * row_bytes
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], at + done)
        self._pending[name] -= tensor.shape[0] if tensor.dim() else 1

    def close(self) -> None:
        if self._fd is None:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        missing = sorted(n for n, rows in self._pending.items() if rows)
        if missing:
            raise RuntimeError(f"{self.path}: tensors never (fully) written: {missing[:5]}")
