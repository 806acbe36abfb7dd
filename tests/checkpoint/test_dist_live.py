"""torch_dist checkpoints against megatron-core's own dist_checkpointing, on real gloo process groups.

Both directions of the layout contract in dist_format's docstring:
- a checkpoint the converter wrote (TP1, one process) loads with `dist_checkpointing.load` into
  live chunks at TP2 x PP2 x VPP2 and gives exactly the weights HF loading gives;
- a checkpoint megatron saved from live TP2 x PP2 x VPP2 chunks (`dist_checkpointing.save` through
  training's in-process writer, model under "model0"/"model1", common state with model_config
  and args) converts to HF bit-exactly.
"""
import argparse
import os

import torch
from ckpttest_lib import assert_same_tensors, hf_tensors
from mv_testlib import spawn

from megatron_vita.checkpoint.convert import convert

LAYOUT = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)


def _rank(rank, world, hf_dir, converted, save_root):
    from megatron_vita.checkpoint.dist_writer import save_in_process
    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import chunk_parameters, load_checkpoint_weights, load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.state import parallel_layout, virtual_pipeline_rank

    cfg = ModelConfig.from_hf_dir(hf_dir)
    par = ParallelConfig(**LAYOUT)
    with parallel_layout(par):
        ref = build_model_chunks(cfg, par)
        load_hf_weights(ref, HFSource(hf_dir), cfg, par)
        chunks = build_model_chunks(cfg, par)
        how = load_checkpoint_weights(chunks, "megatron", converted, cfg, par)
        differ = [n for c, r in zip(chunks, ref) for n, t in chunk_parameters(c).items()
                  if not torch.equal(t, chunk_parameters(r)[n])]
        checked = sum(len(chunk_parameters(c)) for c in chunks)

        state = {}
        for i, chunk in enumerate(ref):
            with virtual_pipeline_rank(i):
                state[f"model{i}"] = chunk.sharded_state_dict()
        state.update(model_config=cfg.to_dict(), iteration=5, checkpoint_version=3.0,
                     args=argparse.Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
        it_dir = os.path.join(save_root, "iter_0000005")
        if rank == 0:
            os.makedirs(it_dir)
        torch.distributed.barrier()
        save_in_process(state, it_dir)
        torch.distributed.barrier()
        if rank == 0:
            with open(os.path.join(save_root, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("5")
    return how, differ, checked


def test_dist_checkpoints_round_trip_through_megatron(tiny_hf_dir, tiny_tensors, tmp_path):
    converted, saved = str(tmp_path / "converted"), str(tmp_path / "saved")
    convert(tiny_hf_dir, converted, "hf", "megatron", progress=False, log=lambda *a: None)
    os.makedirs(saved)
    results = spawn(_rank, 4, tiny_hf_dir, converted, saved, timeout=240)
    for how, differ, checked in results:
        assert how == "megatron dist_checkpointing.load"
        assert checked > 0 and not differ, differ[:5]
    convert(saved, str(tmp_path / "hf"), "megatron", "hf", progress=False, log=lambda *a: None)
    assert_same_tensors(tiny_tensors, hf_tensors(tmp_path / "hf"))
