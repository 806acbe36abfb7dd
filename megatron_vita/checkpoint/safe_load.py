"""`torch.load` that never runs code from a checkpoint.

Checkpoints are loaded with `weights_only=True`. Megatron's legacy `model_optim_rng.pt` files
also hold a few harmless non-tensor objects (an `argparse.Namespace` of the training flags,
enums); only those are allow-listed. A pickle that asks for anything else is refused with an
error that names the file and the global it wanted; a truncated or foreign file is refused with
one line naming it. Both are exceptions the command line prints as one line. `MmapCache` keeps large checkpoint files
memory-mapped while a converter reads them, dropping the pages of each tensor once copied.
"""
from __future__ import annotations

import argparse
import collections
import mmap
import pickle
import sys
import threading
from typing import Any

import torch

# Types legacy Megatron / MindSpeed checkpoints are known to contain besides tensors.
ALLOWED_GLOBALS = [argparse.Namespace, collections.OrderedDict]


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint's pickle asked for a type outside the allow-list."""


class UnreadableCheckpointError(ValueError):
    """The file is not a torch checkpoint that can be read (truncated, corrupt, not torch.save's)."""


def _allowed() -> list:
    allowed = list(ALLOWED_GLOBALS)
    try:
        from megatron.core.enums import ModelType
        from megatron.core.transformer.enums import AttnBackend, AttnMaskType

        allowed += [ModelType, AttnMaskType, AttnBackend]
    except ImportError:  # megatron not installed: tensors and Namespaces are enough
        pass
    return allowed


def load_weights_only(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Load a torch checkpoint with weights_only=True plus the legacy allow-list."""
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle needs objects outside the weights-only allow-list "
            f"(torch says: {str(e).splitlines()[0]}). If you trust this file, re-save it as tensors only."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        if mmap and "mmap" in str(e):
            raise  # an old (non-zip) torch file: MmapCache loads it whole instead
        # torch's own first sentence says what failed (a KeyError from the legacy reader says nothing).
        why = "not in torch.save's format" if isinstance(e, KeyError) else str(e).split(". ")[0].splitlines()[0]
        raise UnreadableCheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
                                        f"{why}") from None


class MmapCache:
    """Torch checkpoint files opened memory-mapped, whose pages are dropped as callers finish.

    A mapped page a conversion has read stays resident and counts in the process RSS until it
    is dropped or the file unmapped, so without care RSS grows to the whole checkpoint. Callers
    copy what they read (never keep views) and then call `done_with`.
    """

    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget = budget_bytes
        self._open: dict = {}
        self._touched = 0
        self._mapped = set()
        self._lock = threading.Lock()  # a converter reads on two threads

    def get(self, path: str) -> Any:
        with self._lock:
            return self._get(path)

    def _get(self, path: str) -> Any:
        if path not in self._open:
            try:
                self._open[path] = load_weights_only(path, mmap=True)
                self._mapped.add(path)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Files from torch < 1.6 (not zip) cannot be mapped: load them whole.
                self._open[path] = load_weights_only(path)
        return self._open[path]

    def done_with(self, path: str, tensor: torch.Tensor) -> None:
        """The caller copied `tensor` (read from `path`): drop its mapped pages from this process.

        Dropping clean pages of a file mapping only unmaps them (the file is unchanged and a later
        read maps them again), so the files stay open and are not re-parsed. Where madvise is not
        available, files are unmapped once `budget` bytes have been read instead.
        """
        nbytes = tensor.numel() * tensor.element_size()
        if path not in self._mapped:
            return  # loaded whole: nothing mapped (and dropping anonymous pages would zero them)
        if nbytes and _madvise_dontneed(tensor.data_ptr(), nbytes):
            return
        self._touched += nbytes
        if self._touched >= self.budget:
            self.release()

    def release(self) -> None:
        self._open.clear()
        self._mapped.clear()
        self._touched = 0


def _madvise_dontneed(address: int, nbytes: int) -> bool:
    """madvise(MADV_DONTNEED) over the pages of [address, address + nbytes); False if unavailable."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC = (libc, mmap.PAGESIZE)
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC or not sys.platform.startswith("linux"):
        return False
    libc, page = _LIBC
    start = address - address % page
    end = -(-(address + nbytes) // page) * page
    return libc.madvise(start, end - start, _MADV_DONTNEED) == 0


_LIBC = None
_MADV_DONTNEED = 4  # Linux
