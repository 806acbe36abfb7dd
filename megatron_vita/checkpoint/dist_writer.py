"""Write megatron dist checkpoints (torch_dist) from the calling process, without forking.

megatron-core 0.12.1's torch_dist writer forks a multiprocessing Manager and one process per
file bucket for every save. In a training process that is unsafe: the data pipeline's threads
(decord readers, tokenizers, the planner) may hold locks or objects at the moment of fork, and a
child then hangs (seen: a decord VideoReader finalised in the forked child), and the Manager
server outlives a rank that exits early. This writer produces the same files (same planner,
same bucket format, same metadata) but writes its buckets in the caller, one after another.
It also passes torch >= 2.8's `serialization_format` to torch's item writer, which
megatron-core 0.12.1's own writer omits (its saves fail on torch 2.13).

Use `save_in_process(sharded_state_dict, checkpoint_dir)` instead of `dist_checkpointing.save`.
"""
from __future__ import annotations

import inspect
import os
import queue
from contextlib import contextmanager
from functools import partial

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync


def _item_writer(transform_list):
    """torch's per-item writer with the arguments this torch version expects.

    megatron-core 0.12.1 calls `_write_item` without the `serialization_format` argument that
    torch >= 2.8 requires; pass it when the installed torch has it.
    """
    from torch.distributed.checkpoint import filesystem as torch_fs

    write_item = torch_fs._write_item
    params = inspect.signature(write_item).parameters
    extra = ()
    if "serialization_format" in params:
        extra = (torch_fs.SerializationFormat.TORCH_SAVE,)
    if "transforms" in params and not transform_list:
        transform_list = [torch_fs._StorageWriterTransforms()]

    def write(stream, data, item, storage_key):
        return write_item(*transform_list, stream, data, item, storage_key, *extra)

    return write


def _write_buckets_here(transform_list, rank, write_buckets, results_queue) -> None:
    """Write every bucket of this rank to its file; results go where megatron's finalize reads them."""
    write = _item_writer(transform_list)
    results = {}
    try:
        for i, (file_name, storage_key, (bytes_data, tensor_data)) in enumerate(write_buckets):
            out = []
            with open(file_name, "wb") as stream:
                for item, data in bytes_data:
                    out.append(write(stream, data, item, storage_key))
                for item, tensor in tensor_data:
                    out.append(write(stream, tensor.cpu(), item, storage_key))
                stream.flush()
                os.fsync(stream.fileno())
            results[i] = out
    except Exception as e:  # reported by megatron's finalize as a worker failure naming it
        results_queue.put(e)
        return
    results_queue.put(results)


class InProcessFileSystemWriter(FileSystemWriterAsync):
    """FileSystemWriterAsync whose write step runs in the calling process."""

    def prepare_write_data(self, plan, planner) -> None:
        original = filesystem_async._get_write_results_queue
        filesystem_async._get_write_results_queue = queue.Queue  # no Manager process
        try:
            super().prepare_write_data(plan, planner)
        finally:
            filesystem_async._get_write_results_queue = original

    def get_save_function_and_args(self):
        fn, stage_fn, args = super().get_save_function_and_args()
        if fn is None:
            return fn, stage_fn, args
        transform_list = [self.transforms] if hasattr(self, "transforms") else []
        return partial(_write_buckets_here, transform_list), stage_fn, args


@contextmanager
def _in_process_writer():
    original = torch_strategy.FileSystemWriterAsync
    torch_strategy.FileSystemWriterAsync = InProcessFileSystemWriter
    try:
        yield
    finally:
        torch_strategy.FileSystemWriterAsync = original


def save_in_process(sharded_state_dict, checkpoint_dir: str) -> None:
    """`dist_checkpointing.save` whose writes run in this process (all ranks call it).

    megatron's synchronous save still runs the write step in a forked process; asking for the
    asynchronous request and executing it here keeps everything in the caller.
    """
    from megatron.core import dist_checkpointing

    with _in_process_writer():
        request = dist_checkpointing.save(sharded_state_dict, checkpoint_dir, async_sharded_save=True)
    args = list(request.async_fn_args)
    if request.preload_fn is not None and args:
        args[1] = request.preload_fn()  # device -> host copies of this rank's buckets
    request._replace(async_fn_args=args).execute_sync()
