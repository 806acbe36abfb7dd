"""megatron-core dist checkpoints (`torch_dist`): the model part, read and written in one process.

Layout contract (what `dist_checkpointing.save({"model": chunk.sharded_state_dict(), ...})`
produces in training and what `DistWriter` writes; `DistSource` reads both):

  SAVE/latest_checkpointed_iteration.txt   the iteration number
  SAVE/iter_XXXXXXX/metadata.json          {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                            "common_backend": "torch", "common_backend_version": 1}
  SAVE/iter_XXXXXXX/common.pt              torch.save of the non-sharded state; it must hold
                                           "model_config" (ModelConfig.to_dict()) and "args"
                                           (argparse.Namespace), and holds "iteration", "checkpoint_version"
  SAVE/iter_XXXXXXX/.metadata, *.distcp    PyTorch DCP; one tensor per sharded key:
    - outside layers: key = the megatron-core name, global shape = the full tensor
      (word embeddings / output layer: vocab rows padded for the layout that saved it)
    - transformer layers (LLM and ViT): key = the name without its layer index, e.g.
      `language_model.decoder.layers.self_attention.linear_qkv.weight`, global shape
      [num_layers, *full]; layer i is index i of the prepended axis whatever the PP/VPP split
    - SwiGLU fc1: [L, 2F, H] = [gate; up] (megatron's swiglu factory saves each half's TP pieces)
    - QKV: grouped per KV group, as in the model; ViT QKV per head
    - each linear's `_extra_state` as a bytes entry `<module>._extra_state/shard_<i>_<L>`
      (`shard_0_1` outside layers); under VPP the state dict has "model0", "model1", ... but
      the keys are the same, so the files do not depend on the layout except for vocab padding
  Entries outside the model (optimizer.*, rng_state, ...) are ignored by the reader.

Before any tensor is read, every `.distcp` file the `.metadata` names is checked to exist and to
be long enough for the byte ranges it lists, so a truncated or missing file is one error naming
it, in the launcher, rather than a failure inside a rank's load. Reading never runs a pickle's code: `.metadata` goes through an unpickler that only builds DCP's
metadata classes, common.pt through `load_weights_only`. Writing streams: DCP asks the planner
for each chunk when it writes it, and the planner fetches (and caches) one full tensor at a time.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_vita.checkpoint import mapping
from megatron_vita.checkpoint.megatron_layout import layout_from_args, megatron_args, resolve_iteration_dir
from megatron_vita.checkpoint.safe_load import UnsafeCheckpointError, load_weights_only
from megatron_vita.checkpoint.tensor_kinds import narrow
from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ParallelConfig

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
COMMON = "common.pt"
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.planner", n) for n in ("WriteItem", "WriteItemType", "TensorWriteData",
                                                          "SavePlan", "LoadPlan", "ReadItem", "LoadItemType")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata objects and torch dtypes/layouts, nothing else."""

    def find_class(self, module, name):
        if (module, name) in _DCP_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               (torch.dtype, torch.layout,
                                                                                torch.memory_format))):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refusing to load {self.path}: its pickle asks for {module}.{name}, which is "
                                    "not part of a dist checkpoint's metadata")


def read_metadata(iter_dir: str):
    path = os.path.join(iter_dir, ".metadata")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: not a complete torch_dist checkpoint")
    with open(path, "rb") as f:
        unpickler = _MetadataUnpickler(f)
        unpickler.path = path
        return unpickler.load()


def data_file_errors(iter_dir: str, metadata) -> List[str]:
    """A line for each data file `metadata` names that is missing or shorter than its byte ranges."""
    need: Dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        path = getattr(info, "relative_path", None)
        if path is not None:
            need[path] = max(need.get(path, 0), int(info.offset) + int(info.length))
    errors = []
    for rel, size in sorted(need.items()):
        path = os.path.join(iter_dir, rel)
        if not os.path.isfile(path):
            errors.append(f"{path} is missing (its .metadata lists data in it)")
        elif os.path.getsize(path) < size:
            errors.append(f"{path} is truncated: {os.path.getsize(path)} bytes, its .metadata needs {size}")
    return errors


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            return read_metadata(str(self.path))

    return SafeReader


class _Into:
    """The two planner callbacks DCP's reader uses: where a read lands, and that it landed."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def resolve_tensor(self, req):
        return narrow(self.dest, req.dest_offsets, req.lengths)

    def commit_tensor(self, req, tensor):
        pass


def _model_roots(cfg: ModelConfig, naming: str) -> Tuple[str, ...]:
    return tuple(sorted({mapping.rename(p.name, naming).split(".", 1)[0] + "." for p in mapping.all_params(cfg)}))


class DistSource:
    """A torch_dist checkpoint's model tensors, read region by region."""

    kind = "megatron"
    format = "torch_dist"

    def __init__(self, path: str, cfg: Optional[ModelConfig] = None):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.iter_dir, self.iteration = resolve_iteration_dir(path)
        self.path = path
        cfg_json = os.path.join(self.iter_dir, "metadata.json")
        if os.path.isfile(cfg_json):
            with open(cfg_json, encoding="utf-8") as f:
                backend = json.load(f).get("sharded_backend")
            if backend != "torch_dist":
                raise ValueError(f"{cfg_json}: sharded_backend is {backend!r}; only 'torch_dist' is supported")
        self.metadata = read_metadata(self.iter_dir)
        broken = data_file_errors(self.iter_dir, self.metadata)
        if broken:
            raise ValueError(f"torch_dist checkpoint {self.iter_dir} is incomplete: " + "; ".join(broken))
        common_path = os.path.join(self.iter_dir, COMMON)
        self.common = load_weights_only(common_path) if os.path.isfile(common_path) else {}
        self.args = self.common.get("args")
        stored = self.common.get("model_config")
        self.stored_cfg = ModelConfig.from_dict(stored) if isinstance(stored, dict) else None
        self.cfg = cfg or self.stored_cfg
        if self.cfg is None:
            raise ValueError(f"{common_path} carries no model_config: pass --model with a preset, a HF checkpoint "
                             "directory or a config JSON")
        cfg = self.cfg
        tensors = {k: md for k, md in self.metadata.state_dict_metadata.items()
                   if isinstance(md, TensorStorageMetadata)}
        self.naming = mapping.detect_naming([k for k in tensors if not k.startswith(("optimizer", "rng_state"))])
        roots = _model_roots(cfg, self.naming)
        self.tensors = {k: md for k, md in tensors.items() if k.startswith(roots)}
        self.layout = layout_from_args(self.args)
        self._reader = _reader_class()(self.iter_dir)
        self._reader.set_up_storage_reader(self.metadata, True)

    def _where(self, param: mapping.Param) -> Tuple[str, Optional[int]]:
        keys = [mapping.sharded_key(n) for n in mapping.reader_names(param.name, self.naming)]
        return next((k for k in keys if k[0] in self.tensors), keys[0])

    def check(self, full_shapes: Dict[str, torch.Size]) -> None:
        from megatron_vita.checkpoint.hf_format import raise_errors

        errors, seen = [], set()
        for p in mapping.all_params(self.cfg):
            key, layer = self._where(p)
            if key in seen:
                continue
            seen.add(key)
            expect = list(full_shapes[p.name])
            if layer is not None:
                expect = [p.rule.layer_count(self.cfg)] + expect
            md = self.tensors.get(key)
            if md is None:
                errors.append(f"missing key '{key}' (the model config expects shape {expect})")
                continue
            found = list(md.size)
            if not p.rule.shard_kind.fits(found, expect):
                errors.append(f"shape mismatch for '{key}': the checkpoint has {found}, the model config expects {expect}")
        for key, md in self.tensors.items():
            if key not in seen:
                errors.append(f"unexpected key '{key}' (shape {list(md.size)}) is not a parameter of the model")
        raise_errors(f"torch_dist checkpoint {self.iter_dir} ({self.naming} names)", errors)

    def dtype_of(self, param: mapping.Param) -> torch.dtype:
        return self.tensors[self._where(param)[0]].properties.dtype

    def read_region(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """Elements [offsets, offsets + sizes) of the checkpoint tensor `key`."""
        from torch.distributed.checkpoint.planner import LoadPlan

        dest = torch.empty(list(sizes), dtype=self.tensors[key].properties.dtype)
        self._reader.read_data(LoadPlan(self._items(key, offsets, sizes)), _Into(dest)).wait()
        return dest

    def _items(self, key: str, offsets: Sequence[int], sizes: Sequence[int]):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        return create_read_items_for_chunk_list(
            key, self.tensors[key], [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))])

    def _region_of(self, param: mapping.Param) -> Tuple[str, List[int], List[int], bool]:
        key, layer = self._where(param)
        size = list(param.rule.shard_kind.model_shape(self.tensors[key].size, self.cfg.language.vocab_size))
        if layer is None:
            return key, [0] * len(size), size, False
        return key, [layer] + [0] * (len(size) - 1), [1] + size[1:], True

    def full(self, param: mapping.Param) -> torch.Tensor:
        key, offsets, sizes, layered = self._region_of(param)
        region = self.read_region(key, offsets, sizes)
        return region[0] if layered else region

    def close(self) -> None:
        pass


class DistWriter:
    """Write full megatron-core tensors as a torch_dist iteration directory (see the module docstring)."""

    def __init__(self, iter_dir: str, cfg: ModelConfig, layout: ParallelConfig, naming: str = "mcore",
                 iteration: int = 0, common: Optional[dict] = None):
        self.iter_dir, self.cfg, self.layout, self.naming, self.iteration = iter_dir, cfg, layout, naming, iteration
        self.common_extra = dict(common or {})
        self._items: List = []
        self._lookup: Dict[Tuple[str, Tuple[int, ...]], Tuple[mapping.Param, Tuple[int, ...], Tuple[int, ...], bool,
                                                               torch.dtype]] = {}
        self._dtype: Optional[torch.dtype] = None

    def plan(self, params: Sequence[mapping.Param], full_shapes: Dict[str, torch.Size],
             dtype_for: Callable[[mapping.Param], torch.dtype]) -> int:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        padded = self.layout.padded_vocab_size(self.cfg.language.vocab_size)
        total, extra = 0, []
        for p in params:
            name = mapping.rename(p.name, self.naming)
            key, layer = mapping.sharded_key(name)
            dtype = dtype_for(p)
            self._dtype = self._dtype or dtype
            stored = p.rule.shard_kind.stored_shape(full_shapes[p.name], padded)
            layers = p.rule.layer_count(self.cfg)
            size = torch.Size(((layers,) if layer is not None else ()) + stored)
            for offsets, sizes in p.rule.shard_kind.regions(stored, self.layout.tp):
                off = ((layer,) if layer is not None else ()) + offsets
                sz = ((1,) if layer is not None else ()) + sizes
                chunk = ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(sz))
                self._items.append(WriteItem(
                    index=MetadataIndex(key, torch.Size(off)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=dtype), size=size)))
                self._lookup[(key, off)] = (p, offsets, sizes, layer is not None, dtype)
                total += torch.Size(sz).numel() * dtype.itemsize
            owner = mapping.extra_state_owner(name)
            if owner is not None:
                okey, _ = mapping.sharded_key(owner)
                shard = f"shard_{layer}_{layers}" if layer is not None else "shard_0_1"
                extra.append(WriteItem(index=MetadataIndex(f"{okey}._extra_state/{shard}"),
                                       type=WriteItemType.BYTE_IO))
        self._items = extra + self._items
        os.makedirs(self.iter_dir, exist_ok=True)
        return total

    def fetch_order(self, params: Sequence[mapping.Param]) -> List[mapping.Param]:
        """The order DCP asks for tensors: its file writer sorts items by global tensor size (stable)."""
        from torch.distributed.checkpoint.planner import WriteItemType

        tensors = [it for it in self._items if it.type != WriteItemType.BYTE_IO]
        tensors.sort(key=lambda it: it.tensor_data.size.numel() * it.tensor_data.properties.dtype.itemsize,
                     reverse=True)
        out = {}
        for it in tensors:
            p = self._lookup[(it.index.fqn, tuple(it.index.offset))][0]
            out.setdefault(p.name, p)
        return list(out.values())

    def write_all(self, params: Sequence[mapping.Param], fetch: Callable[[mapping.Param], torch.Tensor]) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        with warnings.catch_warnings(), _without_record_crc32():
            # "torch.distributed is ... uninitialized, assuming ... a single process": exactly the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_save({}, storage_writer=FileSystemWriter(self.iter_dir, single_file_per_rank=True, thread_count=1),
                     planner=_planner_class()(self, fetch), no_dist=True)

    def piece(self, item, fetch, cache: dict) -> torch.Tensor:
        p, offsets, sizes, layered, dtype = self._lookup[(item.index.fqn, tuple(item.index.offset))]
        if cache.get("name") != p.name:
            cache.clear()
            cache.update(name=p.name, full=fetch(p))
        piece = p.rule.shard_kind.cut(cache["full"], offsets, sizes).to(dtype).contiguous()
        return piece.unsqueeze(0) if layered else piece

    def finish(self) -> None:
        common = {"model_config": self.cfg.to_dict(),
                  "args": megatron_args(self.cfg, self.layout, self._dtype or torch.float32, self.iteration),
                  "checkpoint_version": 3.0, "iteration": self.iteration, **self.common_extra}
        torch.save(common, os.path.join(self.iter_dir, COMMON))
        with open(os.path.join(self.iter_dir, "metadata.json"), "w", encoding="utf-8") as f:
            json.dump(METADATA_JSON, f)


@contextmanager
def _without_record_crc32():
    """DCP stores each chunk as a small torch.save zip inside a .distcp file; only torch.load reads
    them, and it does not check zip CRCs. Computing them is a full extra pass over every byte
    (about a fifth of a conversion's CPU time), so it is skipped while the converter writes."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: CRCs are always computed
        yield
        return
    previous = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = previous


def _planner_class():
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

    class LazyPlanner(DefaultSavePlanner):
        """DCP's planner with a fixed item list whose data is fetched only when DCP writes it."""

        def __init__(self, writer: DistWriter, fetch):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.writer, self.fetch, self.cache = writer, fetch, {}

        def create_local_plan(self):
            self.plan = SavePlan(list(self.writer._items))
            return self.plan

        def create_global_plan(self, all_plans):
            plans, metadata = super().create_global_plan(all_plans)
            # What megatron's planner records per tensor (read back for N-D flattened tensors only).
            metadata.mcore_data = {k: {} for k, md in metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
            return plans, metadata

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save([None], buf)  # a linear's extra state without FP8
                return buf
            return self.writer.piece(write_item, self.fetch, self.cache)

    return LazyPlanner
