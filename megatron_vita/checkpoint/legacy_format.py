"""Megatron's legacy checkpoint (`iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`), streamed.

Each rank file is a torch.save zip: `data.pkl` (the dict `model` / `model0..` state dicts,
`checkpoint_version`, `iteration`, `args`) and one record per tensor. Writing: `StreamingTorchFile`
writes the pickle first (tensors as references to records not yet written, exactly the records
torch.save would produce) and then each tensor record as its data arrives, so a rank file of any
size is written with one tensor in memory; the files load with `torch.load(weights_only=True)`.
Reading: files are memory-mapped through `MmapCache` (weights_only), the layout (TP, PP, VPP,
uneven stages) is read off the directory and chunk contents, the naming variant is detected,
and a full megatron-core tensor is assembled from the TP pieces of its chunk.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_vita.checkpoint import mapping
from megatron_vita.checkpoint.megatron_layout import (
    chunk_params,
    chunks,
    layout_from_chunks,
    megatron_args,
    parse_rank_dir,
    rank_dir,
    resolve_iteration_dir,
    vocab_divisor,
)
from megatron_vita.checkpoint.safe_load import MmapCache
from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ParallelConfig

FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_STORAGE_TYPES = {
    torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
    torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
}


# ---- writing ----------------------------------------------------------------------------------

class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as torch.save pickles a contiguous tensor whose storage is record `key`."""

    def __init__(self, key: str, dtype: torch.dtype, shape: Sequence[int]):
        self.key, self.dtype, self.shape = key, dtype, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride, step = [], 1
        for s in reversed(self.shape):
            stride.insert(0, step)
            step *= s
        numel = step
        return (torch._utils._rebuild_tensor_v2,
                (_StorageRef(self.key, self.dtype, numel), 0, torch.Size(self.shape), tuple(stride), False,
                 collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


class StreamingTorchFile:
    """A torch.save-format file written record by record: the structure first, tensors later.

    `obj` is the object to save with `TensorSlot(name)` wherever a tensor will go; `slots`
    gives each slot's dtype and shape. `write(name, tensor)` streams one tensor in.
    """

    def __init__(self, path: str, obj, slots: Dict[str, Tuple[torch.dtype, Sequence[int]]]):
        self.path = path
        self._keys = {name: str(k) for k, name in enumerate(slots)}
        self._slots = {name: (dtype, tuple(shape)) for name, (dtype, shape) in slots.items()}
        refs = {name: _TensorRef(self._keys[name], dtype, shape) for name, (dtype, shape) in slots.items()}
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(_substitute(obj, refs))
        self._zip = torch._C.PyTorchFileWriter(path)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        for name, value in ((".format_version", "1"), (".storage_alignment", "64"), ("byteorder", "little")):
            self._zip.write_record(name, value, len(value))
        self._pending = set(slots)

    def write(self, name: str, tensor: torch.Tensor, scratch: Optional["Scratch"] = None) -> None:
        """Write one tensor's record. A view (a TP piece) is staged in `scratch`: the zip writer
        takes a storage from its start, and a reused buffer avoids a fresh allocation per piece."""
        dtype, shape = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: '{name}' planned as {dtype} {list(shape)}, got {tensor.dtype} "
                             f"{list(tensor.shape)}")
        if name not in self._pending:
            raise ValueError(f"{self.path}: '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.is_contiguous() and not tensor.storage_offset() and tensor.untyped_storage().nbytes() == nbytes:
            storage = tensor.untyped_storage()
        else:
            storage = (scratch or Scratch()).stage(tensor)
        self._zip.write_record(f"data/{self._keys[name]}", storage, nbytes)
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(self._pending)[:5]}")
        self._zip.write_end_of_file()
        del self._zip


class Scratch:
    """One reusable byte buffer for staging tensors before they are written."""

    def __init__(self):
        self._buf = torch.empty(0, dtype=torch.uint8)

    def stage(self, tensor: torch.Tensor):
        """Copy `tensor` to the start of the buffer (grown as needed); returns the buffer's storage."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        self._buf[:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        return self._buf.untyped_storage()


class TensorSlot:
    """Placeholder for a tensor in the object given to StreamingTorchFile."""

    def __init__(self, name: str):
        self.name = name


def _substitute(obj, refs):
    if isinstance(obj, TensorSlot):
        return refs[obj.name]
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _substitute(v, refs)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _substitute(v, refs) for k, v in obj.items()}
    return obj


class LegacyWriter:
    """Write full megatron-core tensors into a legacy iteration directory at `layout`."""

    def __init__(self, iter_dir: str, cfg: ModelConfig, layout: ParallelConfig, naming: str = "mcore",
                 iteration: int = 0):
        self.iter_dir, self.cfg, self.layout, self.naming, self.iteration = iter_dir, cfg, layout, naming, iteration
        self._files: Dict[Tuple[int, int], StreamingTorchFile] = {}
        self._slots: Dict[Tuple[int, int], Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]] = {}
        self._models: Dict[Tuple[int, int], Dict[str, collections.OrderedDict]] = {}
        self._targets: Dict[str, List[Tuple[Tuple[int, int], str]]] = {}  # param -> [(file, slot)] by TP rank
        self._dummies: List[Tuple[Tuple[int, int], str]] = []
        self._scratch = Scratch()

    def plan(self, params: Sequence[mapping.Param], full_shapes: Dict[str, torch.Size],
             dtype_for: Callable[[mapping.Param], torch.dtype]) -> int:
        """Lay out every rank file and write its structure; returns the bytes of tensor data to come."""
        cfg, layout = self.cfg, self.layout
        wanted = {p.name for p in params}
        padded = layout.padded_vocab_size(cfg.language.vocab_size)
        dtype0 = dtype_for(params[0])
        total = 0
        for chunk in chunks(layout, cfg):
            for tp_rank in range(layout.tp):
                fkey = (tp_rank, chunk.pp_rank)
                slots = self._slots.setdefault(fkey, {})
                state = collections.OrderedDict()
                for p, local in chunk_params(cfg, chunk):
                    if p.name not in wanted:
                        continue
                    key = mapping.rename(local, self.naming)
                    slot = f"{chunk.model_key}/{key}"
                    shape = p.rule.shard_kind.piece_shape(full_shapes[p.name], layout.tp, padded)
                    slots[slot] = (dtype_for(p), shape)
                    state[key] = TensorSlot(slot)
                    self._targets.setdefault(p.name, []).append((fkey, slot))
                    total += torch.Size(shape).numel() * dtype_for(p).itemsize
                if chunk.vp == 0:
                    for dummy in mapping.DUMMIES.get(self.naming, ()):
                        slot = f"{chunk.model_key}/{dummy}"
                        slots[slot] = (dtype0, (cfg.language.hidden_size,))
                        state[dummy] = TensorSlot(slot)
                        self._dummies.append((fkey, slot))
                self._models.setdefault(fkey, {})[chunk.model_key] = state
        args = megatron_args(cfg, layout, dtype0, self.iteration)
        for fkey, slots in self._slots.items():
            directory = os.path.join(self.iter_dir, rank_dir(fkey[0], fkey[1], layout.pp))
            os.makedirs(directory, exist_ok=True)
            obj = {**self._models[fkey], "checkpoint_version": CHECKPOINT_VERSION, "iteration": self.iteration,
                   "args": args, "model_config": cfg.to_dict()}
            self._files[fkey] = StreamingTorchFile(os.path.join(directory, FILE_NAME), obj, slots)
        return total

    def write(self, param: mapping.Param, full: torch.Tensor) -> None:
        padded = self.layout.padded_vocab_size(self.cfg.language.vocab_size)
        for fkey, slot in self._targets[param.name]:
            dtype = self._slots[fkey][slot][0]
            piece = mapping.shard(param, full, self.layout.tp, fkey[0], padded).to(dtype)
            self._files[fkey].write(slot, piece, self._scratch)

    def fetch_order(self, params: Sequence[mapping.Param]) -> List[mapping.Param]:
        """The order `write_all` asks for tensors."""
        return list(params)

    def write_all(self, params: Sequence[mapping.Param], fetch: Callable[[mapping.Param], torch.Tensor]) -> None:
        for p in params:
            self.write(p, fetch(p))
        for fkey, slot in self._dummies:
            dtype, shape = self._slots[fkey][slot]
            self._files[fkey].write(slot, torch.zeros(shape, dtype=dtype))

    def finish(self) -> None:
        for f in self._files.values():
            f.close()


# ---- reading ----------------------------------------------------------------------------------

class LegacySource:
    """A legacy Megatron checkpoint read piece by piece (any TP/PP/VPP, any naming variant)."""

    kind = "megatron"
    format = "legacy"

    def __init__(self, path: str, cfg: Optional[ModelConfig] = None, budget_bytes: int = 512 << 20):
        self.iter_dir, self.iteration = resolve_iteration_dir(path)
        self.path = path
        self._cache = MmapCache(budget_bytes)
        ranks = {}
        for name in sorted(os.listdir(self.iter_dir)):
            rp = parse_rank_dir(name)
            if rp is not None:
                file = os.path.join(self.iter_dir, name, FILE_NAME)
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{file} is missing")
                ranks[rp] = file
        if not ranks:
            raise FileNotFoundError(f"{self.iter_dir} holds no mp_rank_* directories: not a legacy Megatron checkpoint")
        tp = max(t for t, _ in ranks) + 1
        pp = max(p for _, p in ranks) + 1
        missing = [rank_dir(t, p, pp) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
        if missing:
            raise FileNotFoundError(f"{self.iter_dir}: rank directories missing for a TP{tp} PP{pp} layout: {missing}")
        self.files = ranks
        first = self._cache.get(ranks[(0, 0)])
        self.args = first.get("args")
        stored = first.get("model_config")
        self.stored_cfg = ModelConfig.from_dict(stored) if isinstance(stored, dict) else None
        self.cfg = cfg or self.stored_cfg
        if self.cfg is None:
            raise ValueError(f"{ranks[(0, 0)]} carries no model_config (released MindSpeed/TE checkpoints do not): "
                             "pass --model with a preset, a HF checkpoint directory or a config JSON")
        model_keys = sorted(k for k in first if k == "model" or (k.startswith("model") and k[5:].isdigit()))
        if not model_keys:
            raise ValueError(f"{ranks[(0, 0)]} has no 'model' state dict (keys: {sorted(first)[:8]})")
        vpp = None if model_keys == ["model"] else len(model_keys)
        # Names and shapes of every piece, per (tp, pp, model key).
        self._names: Dict[Tuple[int, int, str], Dict[str, Tuple[Tuple[int, ...], torch.dtype]]] = {}
        for (t, p), file in ranks.items():
            obj = self._cache.get(file)
            for mk in model_keys:
                sd = obj.get(mk)
                if not isinstance(sd, dict):
                    raise ValueError(f"{file}: '{mk}' is missing or not a state dict")
                self._names[(t, p, mk)] = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()
                                           if isinstance(v, torch.Tensor)}
            self._cache.release()
        self.naming = mapping.detect_naming([n for d in self._names.values() for n in d])
        llm_layers = mapping.rename(mapping.LLM, self.naming) + "decoder.layers."
        counts = {}
        for (t, p, mk), d in self._names.items():
            if t == 0:
                layers = {mapping.sharded_key(n)[1] for n in d if n.startswith(llm_layers)}
                counts[(p, 0 if mk == "model" else int(mk[5:]))] = len(layers)
        self.layout = layout_from_chunks(tp, pp, vpp, counts, self.cfg.language.num_layers, self.iter_dir,
                                         vocab_divisor(self.args))
        # param name -> [(file, pp rank, model key, key in file)] by TP rank
        self._loc: Dict[str, List[Tuple[str, int, str, str]]] = {}
        for chunk in chunks(self.layout, self.cfg):
            for p, local in chunk_params(self.cfg, chunk):
                present = self._names[(0, chunk.pp_rank, chunk.model_key)]
                names = mapping.reader_names(local, self.naming)
                key = next((n for n in names if n in present), names[0])
                self._loc[p.name] = [(ranks[(t, chunk.pp_rank)], chunk.pp_rank, chunk.model_key, key)
                                     for t in range(tp)]

    def check(self, full_shapes: Dict[str, torch.Size]) -> None:
        """Every piece present with the expected shape; nothing unexpected (no data is read)."""
        from megatron_vita.checkpoint.hf_format import raise_errors

        layout = self.layout
        errors, seen = [], set()
        padded = self._padded_rows()
        for p in mapping.all_params(self.cfg):
            expect = p.rule.shard_kind.piece_shape(full_shapes[p.name], layout.tp, padded)
            for t, (file, pp, mk, key) in enumerate(self._loc[p.name]):
                found = self._names[(t, pp, mk)].get(key)
                seen.add((file, mk, key))
                if found is None:
                    errors.append(f"missing key '{key}' in {file} [{mk}] (expected shape {list(expect)})")
                elif tuple(found[0]) != expect:
                    errors.append(f"shape mismatch for '{key}' in {file} [{mk}]: the checkpoint has "
                                  f"{list(found[0])}, the model config expects {list(expect)}")
        for (t, pp, mk), d in self._names.items():
            file = self.files[(t, pp)]
            for key, (shape, _) in d.items():
                if (file, mk, key) not in seen and not mapping.IGNORED.search(key):
                    errors.append(f"unexpected key '{key}' (shape {list(shape)}) in {file} [{mk}]")
        if padded < self.cfg.language.vocab_size:
            errors.append(f"the checkpoint has {padded} vocabulary rows, the model config's vocab_size is "
                          f"{self.cfg.language.vocab_size}")
        raise_errors(f"Megatron checkpoint {self.iter_dir} ({self.naming} names, {layout.describe()})", errors)

    def _padded_rows(self) -> int:
        """Vocabulary rows as stored (padding included), from the embedding's pieces."""
        file, pp, mk, key = self._loc[mapping.vocab_param(self.cfg).name][0]
        found = self._names[(0, pp, mk)].get(key)
        return found[0][0] * self.layout.tp if found else self.layout.padded_vocab_size(self.cfg.language.vocab_size)

    def dtype_of(self, param: mapping.Param) -> torch.dtype:
        file, pp, mk, key = self._loc[param.name][0]
        return self._names[(0, pp, mk)][key][1]

    def full(self, param: mapping.Param) -> torch.Tensor:
        """The full tensor, assembled piece by piece: each piece is copied out of its mapped file,
        then its pages are dropped, so mapped pages never add up to more than one piece."""
        kind = param.rule.shard_kind
        locs = self._loc[param.name]
        locs = locs[:kind.pieces_to_read(len(locs))]
        first = self._cache.get(locs[0][0])[locs[0][2]][locs[0][3]]
        full = torch.empty(kind.full_shape(first.shape, len(locs), self.cfg.language.vocab_size), dtype=first.dtype)
        del first
        for rank, (file, _, mk, key) in enumerate(locs):
            piece = self._cache.get(file)[mk][key]
            kind.place(full, piece, len(locs), rank)
            self._cache.done_with(file, piece)
        return full

    def close(self) -> None:
        self._cache.release()
