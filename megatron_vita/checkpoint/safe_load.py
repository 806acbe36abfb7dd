"""`torch.load` that never runs code from a checkpoint.

Checkpoints are loaded with `weights_only=True`. Megatron's legacy `model_optim_rng.pt` files
also hold a few harmless non-tensor objects (an `argparse.Namespace` of the training flags,
enums); only those are allow-listed. A pickle that asks for anything else is refused with an
error that names the file and the global it wanted. `MmapCache` keeps large checkpoint files
memory-mapped while a converter reads them, and unmaps them once a byte budget has been read.
"""
from __future__ import annotations

import argparse
import collections
import pickle
import threading
from typing import Any

import torch

# Types legacy Megatron / MindSpeed checkpoints are known to contain besides tensors.
ALLOWED_GLOBALS = [argparse.Namespace, collections.OrderedDict]


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint's pickle asked for a type outside the allow-list."""


def _allowed() -> list:
    allowed = list(ALLOWED_GLOBALS)
    try:
        from megatron.core.enums import ModelType
        from megatron.core.transformer.enums import AttnBackend, AttnMaskType

        allowed += [ModelType, AttnMaskType, AttnBackend]
    except ImportError:  # megatron not installed: tensors and Namespaces are enough
        pass
    return allowed


def safe_torch_load(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Load a torch checkpoint with weights_only=True plus the legacy allow-list."""
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle needs objects outside the weights-only allow-list "
            f"(torch says: {str(e).splitlines()[0]}). If you trust this file, re-save it as tensors only."
        ) from None


class MmapCache:
    """Open torch checkpoint files memory-mapped, and unmap them all once a byte budget is read.

    A mapped page a conversion has read stays resident and counts in the process RSS until the
    file is unmapped, so without a budget RSS would grow to the whole checkpoint. Callers copy
    what they read (never keep views) and report the bytes with `touched`.
    """

    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget = budget_bytes
        self._open: dict = {}
        self._touched = 0
        self._lock = threading.Lock()  # a converter reads on two threads

    def get(self, path: str) -> Any:
        with self._lock:
            return self._get(path)

    def _get(self, path: str) -> Any:
        if path not in self._open:
            try:
                self._open[path] = safe_torch_load(path, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Files from torch < 1.6 (not zip) cannot be mapped: load them whole.
                self._open[path] = safe_torch_load(path)
        return self._open[path]

    def touched(self, nbytes: int) -> None:
        self._touched += nbytes
        if self._touched >= self.budget:
            self.release()

    def release(self) -> None:
        self._open.clear()
        self._touched = 0
