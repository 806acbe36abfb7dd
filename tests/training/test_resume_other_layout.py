"""--load at another parallel layout: weights reshard; the optimizer state is refused clearly.

A TP=2 run saves at iteration 4. Then:

- loading that checkpoint at PP=2 with the loader training uses (`checkpointing.load_checkpoint`,
  megatron's dist_checkpointing under resharding) gives, on every rank and for every parameter,
  bit for bit the tensors stored in the checkpoint (read straight from its files by the
  converter's reader, `DistSource`);
- resuming at PP=2 with its optimizer state is refused by the checks made before any rank starts,
  in one line that names the changed flags and the fix;
- with --no-load-optim it continues from the saved iteration and data position with the saved
  weights: its first loss and samples equal those of a --no-load-optim resume at the saved
  layout (a forward's loss depends on the weights and the batch only), within the tolerance
  the parallel-layout tests use.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_vita.config.parallel import ConfigError
from megatron_vita.training import config as train_config
from megatron_vita.training.cli import build_config
from mv_testlib import rel_diff, spawn

RECIPE = ["--recipe", "data_recipes/demo.yaml", "--stage", "2", "--lr", "1e-3", "--global-batch-size", "2",
          "--num-workers", "1"]


def _train(repo, data, *flags):
    return subprocess.run([sys.executable, "-m", "megatron_vita", "train", "--data-root", data, *RECIPE, *flags],
                          cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_config.add_arguments(parser)
    return parser.parse_args(argv)


def _metrics(path):
    with open(path) as f:
        return {r["iteration"]: r for r in map(json.loads, f)}


def _reload_rank(rank, world, save, layout):
    """Load `save` at `layout` as training does; compare every parameter with the checkpoint's files."""
    from megatron.core import parallel_state as ps

    from megatron_vita.checkpoint import mapping
    from megatron_vita.checkpoint.dist_format import DistSource
    from megatron_vita.checkpoint.model_io import chunk_parameters
    from megatron_vita.config import ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks, chunk_layers
    from megatron_vita.parallel.state import parallel_layout
    from megatron_vita.training.checkpointing import load_checkpoint

    saved = DistSource(save)
    cfg, vocab = saved.cfg, saved.cfg.language.vocab_size
    par = ParallelConfig(**layout)
    checked, mismatched = [], []
    with parallel_layout(par):
        chunks = build_model_chunks(cfg, par)
        loaded = load_checkpoint(save, chunks, load_optim=False, load_rng=False)
        tp, tp_rank, pp_rank = par.tp, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        for vp, chunk in enumerate(chunks):
            layers = chunk_layers(cfg, par, pp_rank, vp)
            for local, value in chunk_parameters(chunk).items():
                p = mapping.lookup(mapping.local_to_global(local, layers))
                rows = value.shape[0]
                if p.rule.shard == "vocab":
                    # Padded vocabulary rows are the layout's, not the model's.
                    expected = mapping.shard(p, saved.full(p), tp, tp_rank, rows * tp)
                    rows = max(0, min(rows, vocab - tp_rank * rows))
                else:
                    expected = mapping.shard(p, saved.full(p), tp, tp_rank)
                checked.append(p.name)
                if value.shape != expected.shape or not torch.equal(value.detach()[:rows], expected[:rows]):
                    mismatched.append(p.name)
    every = sorted(p.name for p in mapping.all_params(cfg))
    return dict(iteration=loaded["iteration"], checked=checked, mismatched=mismatched, every=every)


@pytest.mark.timeout(1500)
def test_resume_at_another_layout(demo_data, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    save = str(tmp_path / "run")
    first = _train(repo, demo_data, "--tensor-model-parallel-size", "2", "--train-iters", "4", "--save", save,
                   "--metrics-file", str(tmp_path / "a.jsonl"))
    assert first.returncode == 0, first.stderr[-3000:]

    reports = spawn(_reload_rank, 2, save, dict(pipeline_model_parallel_size=2), timeout=300)
    assert [r["iteration"] for r in reports] == [4, 4]
    assert [r["mismatched"] for r in reports] == [[], []], "resharded weights differ from the saved ones"
    held = [set(r["checked"]) for r in reports]
    assert not held[0] & held[1] and held[0] | held[1] == set(reports[0]["every"])  # PP2: each rank its own

    # The refusal comes from the checks made before any rank starts (what `train` runs first).
    flags = ["--data-root", demo_data, *RECIPE, "--pipeline-model-parallel-size", "2", "--train-iters", "6",
             "--load", save]
    flags[flags.index("data_recipes/demo.yaml")] = os.path.join(repo, "data_recipes/demo.yaml")
    with pytest.raises(ConfigError) as refused:
        build_config(_parse(flags), world_size=2)
    problems = "\n".join(refused.value.problems)
    assert "--pipeline-model-parallel-size 1 -> 2" in problems and "--no-load-optim" in problems
    # Before the PP=2 run saves iteration 6 over it: iteration 5 from the same weights at the saved layout.
    same = _train(repo, demo_data, "--tensor-model-parallel-size", "2", "--train-iters", "5", "--load", save,
                  "--no-load-optim", "--metrics-file", str(tmp_path / "same.jsonl"))
    assert same.returncode == 0, same.stderr[-3000:]
    resumed = _train(repo, demo_data, "--pipeline-model-parallel-size", "2", "--train-iters", "6", "--load", save,
                     "--no-load-optim", "--save", save, "--metrics-file", str(tmp_path / "b.jsonl"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "start iteration 4" in resumed.stdout
    trained, at_saved_layout, continued = (_metrics(tmp_path / n) for n in ("a.jsonl", "same.jsonl", "b.jsonl"))
    assert sorted(trained) == list(range(1, 5)) and sorted(at_saved_layout) == [5] and sorted(continued) == [5, 6]
    assert continued[5]["samples"] == at_saved_layout[5]["samples"]
    assert rel_diff(continued[5]["loss"], at_saved_layout[5]["loss"]) <= 1e-5, (continued[5], at_saved_layout[5])
