"""The released Hugging Face layout as a conversion source and target, streamed tensor by tensor.

Source: `HFSource` reads a `*_HF` directory (sharded or single safetensors, or `.bin` files)
one tensor at a time with positioned reads, checks every name and shape against the model the
config describes before any data is read, and serves full megatron-core tensors
(`mapping.to_mcore`). Target: `HFWriter` plans HF-standard shards
(`model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`) from the known shapes,
writes each tensor as it arrives, then writes config.json, generation_config.json and copies
tokenizer / processor files, so the result loads with `from_pretrained`.

Expected shapes come from the HF model class itself, built on the meta device (no memory).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_vita.checkpoint import mapping
from megatron_vita.checkpoint.safe_load import MmapCache
from megatron_vita.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter
from megatron_vita.config.model import ModelConfig

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files beside the weights that a usable HF checkpoint carries; copied when present.
AUX_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
# Non-parameter tensors some Qwen2 exports carry; they are recomputed by the model.
_HARMLESS = re.compile(r"\.rotary_emb\.inv_freq$")
DEFAULT_MAX_SHARD = 5 * 1000 ** 3


def model_shapes(cfg: ModelConfig) -> Tuple[Dict[str, torch.Size], Dict[str, torch.Size]]:
    """(HF name -> shape, megatron-core name -> full shape) of the model `cfg` describes."""
    from megatron_vita.hf.configuration import LongVITAConfig
    from megatron_vita.hf.modeling import LongVITAForCausalLM

    with torch.device("meta"):
        model = LongVITAForCausalLM(LongVITAConfig.from_model_config(cfg))
    hf = {k: v.shape for k, v in model.state_dict().items()}
    full = {}
    for p in mapping.all_params(cfg):
        metas = [torch.empty(hf[h], device="meta") for h in p.hf_names]
        full[p.name] = mapping.to_mcore(cfg, p, metas).shape
    return hf, full


def shape_errors(where: str, found: Dict[str, Sequence[int]], expected: Dict[str, Sequence[int]],
                 ignore=lambda name: False) -> List[str]:
    """Missing keys, unexpected keys and shape mismatches, each naming the key and both shapes."""
    errors = []
    for name, shape in expected.items():
        if name not in found:
            errors.append(f"missing key '{name}' (the model config expects shape {list(shape)})")
        elif tuple(found[name]) != tuple(shape):
            errors.append(f"shape mismatch for '{name}': {where} has {list(found[name])}, "
                          f"the model config expects {list(shape)}")
    for name, shape in found.items():
        if name not in expected and not ignore(name):
            errors.append(f"unexpected key '{name}' (shape {list(shape)}) is not a parameter of the model")
    return errors


def raise_errors(where: str, errors: List[str]) -> None:
    if errors:
        more = f"\n  ... and {len(errors) - 12} more" if len(errors) > 12 else ""
        raise ValueError(f"{where} does not match the model config:\n  " + "\n  ".join(errors[:12]) + more)


class HFSource:
    """A HF checkpoint directory read tensor by tensor."""

    kind = "hf"

    def __init__(self, path: str, cfg: Optional[ModelConfig] = None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HF checkpoint directory {path} does not exist")
        self.path = path
        self.cfg = cfg if cfg is not None else ModelConfig.from_hf_dir(path)
        self._files: Dict[str, SafetensorsFile] = {}
        self._lock = threading.Lock()
        self._bins = MmapCache()
        self.weight_map = self._weight_map()
        self._meta: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for name, file in self.weight_map.items():
            if file.endswith(".safetensors"):
                e = self._safe(file).entries[name]
                self._meta[name] = (e.shape, e.dtype)
        for file in sorted({f for f in self.weight_map.values() if not f.endswith(".safetensors")}):
            for name, t in self._bins.get(os.path.join(path, file)).items():
                if self.weight_map.get(name) == file:
                    self._meta[name] = (tuple(t.shape), t.dtype)
            self._bins.release()

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
        if os.path.isfile(os.path.join(self.path, "model.safetensors")):
            return {n: "model.safetensors" for n in self._safe("model.safetensors").entries}
        if os.path.isfile(os.path.join(self.path, "pytorch_model.bin")):
            names = self._bins.get(os.path.join(self.path, "pytorch_model.bin"))
            return {n: "pytorch_model.bin" for n in names}
        raise FileNotFoundError(f"{self.path} holds no weights: expected {SAFE_INDEX}, model.safetensors, "
                                f"{BIN_INDEX} or pytorch_model.bin")

    def _safe(self, file: str) -> SafetensorsFile:
        with self._lock:  # the converter reads ahead on a second thread
            if file not in self._files:
                self._files[file] = SafetensorsFile(os.path.join(self.path, file))
            return self._files[file]

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {n: s for n, (s, _) in self._meta.items()}

    def check(self) -> None:
        """Raise naming every missing, unexpected or mis-shaped tensor (no data is read)."""
        hf_shapes, _ = model_shapes(self.cfg)
        raise_errors(f"HF checkpoint {self.path}",
                     shape_errors("the checkpoint", self.shapes(), hf_shapes, lambda n: bool(_HARMLESS.search(n))))

    def dtype_of(self, param: mapping.Param) -> torch.dtype:
        return self._meta[param.hf_names[0]][1]

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(f"{self.path}: checkpoint has no tensor '{name}'")
        if file.endswith(".safetensors"):
            return self._safe(file).read(name, rows)
        path = os.path.join(self.path, file)
        mapped = self._bins.get(path)[name]
        mapped = mapped if rows is None else mapped[rows[0]:rows[1]]
        t = mapped.clone()
        self._bins.done_with(path, mapped)
        return t

    def full(self, param: mapping.Param) -> torch.Tensor:
        segments = mapping.row_segments(self.cfg, param)
        files = {self.weight_map.get(h, "") for h in param.hf_names}
        if segments is None or not all(f.endswith(".safetensors") for f in files):
            return mapping.to_mcore(self.cfg, param, [self.read(h) for h in param.hf_names])
        # Read each run of rows straight into its place in the full tensor.
        first = self._meta[param.hf_names[0]]
        runs = [(h, start, self._meta[h][0][0] if n < 0 else n) for h, start, n in segments]
        out = torch.empty((sum(n for _, _, n in runs), *first[0][1:]), dtype=first[1])
        row = 0
        for h, start, n in runs:
            self._safe(self.weight_map[h]).read_into(h, out[row:row + n], (start, start + n))
            row += n
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._bins.release()


class HFWriter:
    """Write a HF checkpoint directory from full megatron-core tensors, one at a time."""

    def __init__(self, out_dir: str, cfg: ModelConfig, max_shard_size: int = DEFAULT_MAX_SHARD,
                 aux_dir: Optional[str] = None):
        self.out_dir, self.cfg, self.max_shard_size, self.aux_dir = out_dir, cfg, max_shard_size, aux_dir
        self._writers: Dict[str, SafetensorsWriter] = {}
        self._file_of: Dict[str, str] = {}
        self._dtype_of: Dict[str, torch.dtype] = {}
        self._rows_of: Dict[str, int] = {}
        self.dtype: Optional[torch.dtype] = None

    def plan(self, params: Sequence[mapping.Param], full_shapes: Dict[str, torch.Size],
             dtype_for: Callable[[mapping.Param], torch.dtype]) -> int:
        """Lay out the shards; returns the bytes that will be written."""
        hf_shapes, _ = model_shapes(self.cfg)
        shards: List[List[Tuple[str, torch.dtype, Sequence[int]]]] = [[]]
        size, total = 0, 0
        for p in params:
            dtype = dtype_for(p)
            self.dtype = self.dtype or dtype
            for h in p.hf_names:
                nbytes = hf_shapes[h].numel() * dtype.itemsize
                if shards[-1] and size + nbytes > self.max_shard_size:
                    shards.append([])
                    size = 0
                shards[-1].append((h, dtype, tuple(hf_shapes[h])))
                self._dtype_of[h] = dtype
                self._rows_of[h] = hf_shapes[h][0] if len(hf_shapes[h]) else 1
                size += nbytes
                total += nbytes
        n = len(shards)
        os.makedirs(self.out_dir, exist_ok=True)
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            self._writers[file] = SafetensorsWriter(os.path.join(self.out_dir, file), shard)
            self._file_of.update({name: file for name, _, _ in shard})
        self._total = total
        return total

    def write(self, param: mapping.Param, full: torch.Tensor) -> None:
        segments = mapping.row_segments(self.cfg, param)
        if segments is None:
            for name, tensor in mapping.to_hf(self.cfg, param, full).items():
                self._writer(name).write(name, tensor.to(self._dtype_of[name]))
            return
        # Each run of rows goes straight to its place in its HF tensor (no HF-shaped copies).
        row = 0
        for name, start, n in segments:
            n = self._rows_of[name] if n < 0 else n
            self._writer(name).write(name, full[row:row + n].to(self._dtype_of[name]), row_offset=start)
            row += n
        if row != full.shape[0]:
            raise ValueError(f"{param.name}: {full.shape[0]} rows, the HF tensors hold {row}")

    def _writer(self, name: str) -> SafetensorsWriter:
        return self._writers[self._file_of[name]]

    def fetch_order(self, params: Sequence[mapping.Param]) -> List[mapping.Param]:
        """The order `write_all` asks for tensors."""
        return list(params)

    def write_all(self, params: Sequence[mapping.Param], fetch: Callable[[mapping.Param], torch.Tensor]) -> None:
        for p in params:
            self.write(p, fetch(p))

    def finish(self) -> None:
        for w in self._writers.values():
            w.close()
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(self._file_of.items()))}
        with open(os.path.join(self.out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        self._write_config()
        for name in AUX_FILES:
            src = os.path.join(self.aux_dir, name) if self.aux_dir else None
            if src and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(self.out_dir, name))
        if not os.path.isfile(os.path.join(self.out_dir, "generation_config.json")):
            from megatron_vita.hf.configuration import LongVITAConfig
            from megatron_vita.hf.tiny import generation_config_for

            generation_config_for(LongVITAConfig.from_model_config(self.cfg)).save_pretrained(self.out_dir)

    def _write_config(self) -> None:
        """The reference config.json when it describes this model (keeps released extra keys), else a new one."""
        dtype_name = str(self.dtype or torch.float32).replace("torch.", "")
        config = None
        ref = os.path.join(self.aux_dir, "config.json") if self.aux_dir else None
        if ref and os.path.isfile(ref):
            try:
                if ModelConfig.from_hf_dir(self.aux_dir).to_hf_dict() == self.cfg.to_hf_dict():
                    with open(ref, encoding="utf-8") as f:
                        config = json.load(f)
            except ValueError:
                config = None
        if config is None:
            from megatron_vita.hf.configuration import LongVITAConfig

            config = json.loads(LongVITAConfig.from_model_config(self.cfg).to_json_string())
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = dtype_name
        with open(os.path.join(self.out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
