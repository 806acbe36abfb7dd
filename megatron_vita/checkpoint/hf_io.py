"""Read Hugging Face checkpoints tensor by tensor (safetensors, sharded or not; .bin too).

Reading is lazy: `HFCheckpoint.get(name)` opens the shard that holds `name` and reads that one
tensor, so peak memory is one tensor, not one model. `.bin` files are loaded with
`torch.load(weights_only=True, mmap=True)`: a pickle that wants to run code is refused.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import torch

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class HFCheckpoint:
    """A HF checkpoint directory: config plus a name -> file map of its weights."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HF checkpoint directory {path} does not exist")
        self.path = path
        self._safe_handles: Dict[str, object] = {}
        self._bin_cache: Dict[str, Dict[str, torch.Tensor]] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> Dict[str, str]:
        for index in (SAFE_INDEX, BIN_INDEX):
            index_path = os.path.join(self.path, index)
            if os.path.isfile(index_path):
                with open(index_path, encoding="utf-8") as f:
                    try:
                        weight_map = json.load(f)["weight_map"]
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ValueError(f"{index_path}: not a valid weight index ({e})") from None
                missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(self.path, f))})
                if missing:
                    raise FileNotFoundError(f"{index_path} lists shard(s) that do not exist: {missing}")
                return dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            file = os.path.join(self.path, single)
            if os.path.isfile(file):
                return {name: single for name in self._names_in(single)}
        raise FileNotFoundError(
            f"{self.path} holds no weights: expected {SAFE_INDEX}, model.safetensors, {BIN_INDEX} or pytorch_model.bin")

    def _names_in(self, file: str) -> List[str]:
        if file.endswith(".safetensors"):
            return list(self._safe(file).keys())
        return list(self._bin(file).keys())

    def _safe(self, file: str):
        if file not in self._safe_handles:
            from safetensors import safe_open

            self._safe_handles[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._safe_handles[file]

    def _bin(self, file: str) -> Dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            from megatron_vita.checkpoint.safe_load import safe_torch_load

            # mmap keeps the file on disk; only touched tensors are paged in.
            self._bin_cache = {file: safe_torch_load(os.path.join(self.path, file), mmap=True)}
        return self._bin_cache[file]

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, "config.json")

    def names(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(f"{self.path}: checkpoint has no tensor '{name}'")
        if file.endswith(".safetensors"):
            return self._safe(file).get_tensor(name)
        return self._bin(file)[name]

    def shape(self, name: str) -> Optional[torch.Size]:
        file = self.weight_map.get(name)
        if file is None:
            return None
        if file.endswith(".safetensors"):
            return torch.Size(self._safe(file).get_slice(name).get_shape())
        return self._bin(file)[name].shape

    def files(self) -> Iterable[str]:
        return sorted(set(self.weight_map.values()))

    def close(self) -> None:
        self._safe_handles.clear()
        self._bin_cache.clear()
