"""Write megatron dist checkpoints (torch_dist) from the calling process, without forking.

megatron-core 0.12.1's torch_dist writer forks a multiprocessing Manager and one process per
file bucket for every save. In a training process that is unsafe: the data pipeline's threads
(decord readers, tokenizers, the planner) may hold locks or objects at the moment of fork, and a
child then hangs (seen: a decord VideoReader finalised in the forked child), and the Manager
server outlives a rank that exits early. The two patches here (`write_buckets_in_process`
for `FileSystemWriterAsync.write_preloaded_data_multiproc`, `plain_results_queue` for
`_get_write_results_queue`, registered in `megatron_vita.parallel.megatron_patches` and
applied by `platform.activate`) keep megatron's planner, bucket format and metadata but write
the buckets in the caller, one after another. The writer also passes torch >= 2.8's
`serialization_format` to torch's item writer, which megatron-core 0.12.1's own writer omits
(its saves fail on torch 2.13).

Use `save_in_process(sharded_state_dict, checkpoint_dir)` instead of `dist_checkpointing.save`.
"""
from __future__ import annotations

import inspect
import os
import queue

from megatron_vita.parallel import megatron_patches


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


def write_buckets_in_process(transform_list, rank, write_buckets, results_queue) -> None:
    """Write every bucket of this rank to its file; results go where megatron's finalize reads them.

    Replaces megatron's `FileSystemWriterAsync.write_preloaded_data_multiproc` (same arguments).
    """
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


def plain_results_queue() -> queue.Queue:
    """Replaces megatron's `_get_write_results_queue` (a multiprocessing Manager's queue): the
    results are written and read in the same process."""
    return queue.Queue()


def save_in_process(sharded_state_dict, checkpoint_dir: str) -> None:
    """`dist_checkpointing.save` whose writes run in this process (all ranks call it).

    Asks megatron for the asynchronous request and executes it here, after its preload step
    (device -> host copies), as megatron's asynchronous caller would in another process.
    """
    from megatron.core import dist_checkpointing

    megatron_patches.require("dist-save-in-process", "dist-save-plain-queue")
    request = dist_checkpointing.save(sharded_state_dict, checkpoint_dir, async_sharded_save=True)
    args = list(request.async_fn_args)
    if request.preload_fn is not None and args:
        args[1] = request.preload_fn()  # device -> host copies of this rank's buckets
    request._replace(async_fn_args=args).execute_sync()
