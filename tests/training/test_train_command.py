"""`megatron-vita train` as a user meets it: its checks before any rank starts, and its torchrun path.

Checks: flag values, the layout against the model, paths that training writes at its first save
or at the end, another run's checkpoints in --save, the weights of --init-hf, the iteration --load
would read and whether the data can fill a sequence are all checked by `build_config` (what the
launcher runs before spawning, and each torchrun process before joining the group): every
problem, one line each. Each case here used to start ranks and end in a traceback, crash after
training, or silently do the wrong thing.

Torchrun (the launcher the example scripts use): `--export-hf` writes the HF export there too.
"""
import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_vita.config.parallel import ConfigError
from megatron_vita.training import config as tc
from megatron_vita.training.cli import build_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "data_recipes", "demo.yaml")


@pytest.fixture(autouse=True)
def _not_under_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _problems(data, *flags):
    parser = argparse.ArgumentParser()
    tc.add_arguments(parser)
    args = parser.parse_args(["--recipe", RECIPE, "--data-root", data, "--stage", "1", *flags])
    try:
        build_config(args)
    except ConfigError as e:
        assert all("\n" not in p for p in e.problems), e.problems
        return e.problems
    return []


def _only(problems, prefix):
    return [p for p in problems if p.startswith(prefix)]


def test_valid_configuration_passes(demo_data, tmp_path):
    assert _problems(demo_data, "--tensor-model-parallel-size", "2", "--save", str(tmp_path / "run"),
                     "--metrics-file", str(tmp_path / "run" / "m.jsonl")) == []


def test_bad_values_are_all_reported_together(demo_data):
    problems = _problems(demo_data, "--train-iters", "-1", "--global-batch-size", "0", "--lr", "nan",
                         "--seq-length", "8", "--adam-beta2", "1.0", "--lr-decay-style", "cosin",
                         "--recompute-granularity", "full", "--micro-batch-size", "0")
    for flag in ("--train-iters -1", "--global-batch-size 0", "--lr nan", "--seq-length", "--adam-beta2 1.0",
                 "--lr-decay-style 'cosin'", "--micro-batch-size 0"):
        assert len(_only(problems, flag)) == 1, (flag, problems)
    # megatron-core asserts these in every rank: full recompute needs a method and a layer count.
    assert _only(problems, "--recompute-granularity full needs --recompute-method uniform or block"), problems
    assert _only(problems, "--recompute-granularity full needs --recompute-num-layers"), problems
    assert len(problems) == 9, problems


def test_learning_rates(demo_data):
    assert _problems(demo_data, "--lr=-1e-3") == ["--lr -0.001: expected a finite number >= 0"]
    assert _problems(demo_data, "--lr", "inf") == ["--lr inf: expected a finite number >= 0"]
    assert _only(_problems(demo_data, "--lr", "1e-4", "--min-lr", "1e-3"), "--min-lr 0.001: larger than --lr")


def test_layout_is_checked_against_the_model(demo_data):
    # The tiny model: 4 LLM heads in 2 KV groups, 4 layers, ViT 4 heads.
    tp3 = _problems(demo_data, "--tensor-model-parallel-size", "3")
    assert len(tp3) == 4 and all(p.startswith("--tensor-model-parallel-size 3 does not divide") for p in tp3), tp3
    assert _only(_problems(demo_data, "--tensor-model-parallel-size", "4"), "--tensor-model-parallel-size 4 does "
                 "not divide the LLM's 2 KV groups")
    assert _only(_problems(demo_data, "--pipeline-model-parallel-size", "3"), "--pipeline-model-parallel-size 3: 4 "
                 "layers do not split evenly")
    assert _only(_problems(demo_data, "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                           "3"), "--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 LLM layers")
    for algo in ("ring", "ulysses", "megatron_cp_algo", "ulysses_cp_algo"):
        assert _problems(demo_data, "--context-parallel-size", "2", "--context-parallel-algo", algo) == [], algo
    assert _problems(demo_data, "--context-parallel-size", "4", "--context-parallel-algo", "hybrid",
                     "--ulysses-degree-in-cp", "2") == []
    assert _only(_problems(demo_data, "--tensor-model-parallel-size", "2", "--nproc-per-node", "3"),
                 "world size 3 is not divisible by TP*PP*CP = 2*1*1")
    # 2 data-parallel ranks of micro-batch 1 cannot make a global batch of 3.
    assert _problems(demo_data, "--nproc-per-node", "2", "--global-batch-size", "3") == [
        "--global-batch-size 3: not a multiple of --micro-batch-size 1 x data-parallel size 2 (world size 2 / "
        "TP*PP*CP 1)"]


def test_context_parallel_layouts_are_refused_before_any_rank_starts(demo_data):
    # The tiny model: 4 LLM heads, so 2 per rank at TP 2, which do not split over 4 Ulysses ranks.
    assert _problems(demo_data, "--context-parallel-size", "4", "--context-parallel-algo", "ulysses",
                     "--tensor-model-parallel-size", "2") == [
        "--context-parallel-algo ulysses with --context-parallel-size 4: each of the 2 tensor-parallel ranks holds "
        "4/2 = 2 query heads, which do not split over 4 Ulysses ranks; use ring, or hybrid with --ulysses-degree-in-cp 2"]
    assert _only(_problems(demo_data, "--context-parallel-size", "2", "--context-parallel-algo", "zigzag"),
                 "--context-parallel-algo 'zigzag': use ring, ulysses or hybrid")
    assert _only(_problems(demo_data, "--context-parallel-size", "4", "--context-parallel-algo", "hybrid",
                           "--ulysses-degree-in-cp", "3"), "--ulysses-degree-in-cp 3: hybrid needs a degree > 1")
    assert _only(_problems(demo_data, "--context-parallel-size", "2", "--context-parallel-algo", "hybrid"),
                 "--context-parallel-algo hybrid with --context-parallel-size 2 needs --ulysses-degree-in-cp")
    assert _only(_problems(demo_data, "--context-parallel-size", "4", "--seq-length", "100"),
                 "--seq-length 100 with --context-parallel-size 4 must be a multiple of 8")
    assert _only(_problems(demo_data, "--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                           "--sequence-parallel", "--seq-length", "130"),
                 "--seq-length 130 with --context-parallel-size 2 must be a multiple of 4 (CP * lcm(2, TP)")
    assert _only(_problems(demo_data, "--ulysses-degree-in-cp", "2"),
                 "--ulysses-degree-in-cp 2 needs --context-parallel-size > 1")


def test_outputs_must_be_writable_before_training(demo_data, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "dir"
    a_dir.mkdir()
    problems = _problems(demo_data, "--save", str(a_file / "sub"), "--tensorboard-dir", str(a_file),
                         "--metrics-file", str(a_dir), "--export-hf", str(a_file / "hf"),
                         "--loss-curve", str(a_file / "curve.png"))
    assert problems == [
        f"--save {a_file}/sub: {a_file} is not a directory",
        f"--tensorboard-dir {a_file}: exists and is not a directory",
        f"--export-hf {a_file}/hf: {a_file} is not a directory",
        f"--metrics-file {a_dir}: is a directory, expected a file path",
        f"--loss-curve {a_file}/curve.png: {a_file} is not a directory",
    ], problems
    assert _problems(demo_data, "--save", str(a_file)) == [f"--save {a_file}: exists and is not a directory"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_directory_is_refused_even_for_root(demo_data):
    # Modes do not stop root; a directory no one can create entries in does.
    problems = _problems(demo_data, "--save", "/proc/megatron-vita-test/save")
    assert len(problems) == 1 and problems[0].startswith("--save /proc/megatron-vita-test/save: cannot write in "
                                                         "/proc"), problems


def test_export_dir_with_unrelated_files_is_refused(demo_data, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("mine")
    problems = _problems(demo_data, "--save", str(tmp_path / "run"), "--export-hf", str(export))
    assert _only(problems, f"--export-hf {export}: a non-empty directory that is not an HF checkpoint"), problems


def test_save_over_another_runs_checkpoints_needs_load_or_override(demo_data, tmp_path):
    run = tmp_path / "run"
    (run / "iter_0000004").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("4")
    refused = _only(_problems(demo_data, "--save", str(run)), f"--save {run}: already holds checkpoints")
    assert len(refused) == 1 and "--override-save" in refused[0] and f"--load {run}" in refused[0], refused
    assert not _only(_problems(demo_data, "--save", str(run), "--override-save"), "--save")
    # Continuing the run there is fine (this fake iteration is then refused as incomplete, by --load).
    resumed = _problems(demo_data, "--save", str(run), "--load", str(run))
    assert not _only(resumed, "--save") and _only(resumed, f"--load {run}: iteration 4"), resumed
    # ... restarting at iteration 0 from its weights is not.
    assert _only(_problems(demo_data, "--save", str(run), "--load", str(run), "--finetune"), "--save")
    assert _problems(demo_data, "--override-save") == ["--override-save needs --save"]


def test_data_that_cannot_fill_a_sequence_is_refused(demo_data, tmp_path):
    # The demo recipe's four files, every line unreadable: the ranks would never get a batch.
    (tmp_path / "train").mkdir()
    os.symlink(os.path.join(demo_data, "tokenizer"), tmp_path / "tokenizer")
    for name in ("image_colour", "image_shape", "video_motion", "text"):
        (tmp_path / "train" / f"{name}.jsonl").write_text("not json\n{broken\n")
    problems = _problems(str(tmp_path))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"--recipe {RECIPE} (--data-root {tmp_path}): no usable record in all 8 records"), \
        problems


def _write_iteration(root, iteration):
    """A small but real torch_dist iteration: DCP data + .metadata, megatron's common.pt and metadata.json."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(root, f"iter_{iteration:07d}")
    dcp.save({"w": torch.arange(4096, dtype=torch.float32)}, checkpoint_id=path, no_dist=True)
    torch.save({"iteration": iteration}, os.path.join(path, "common.pt"))
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write('{"sharded_backend": "torch_dist"}')
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_half_written_latest_iteration_is_named_before_loading(demo_data, tmp_path):
    from megatron_vita.training.checkpointing import missing_files, resolve_iteration

    root = str(tmp_path / "ckpt")
    _write_iteration(root, 2)
    latest = _write_iteration(root, 4)
    assert missing_files(latest) == [] and resolve_iteration(root) == 4
    data_file = next(f for f in os.listdir(latest) if f.endswith(".distcp"))
    with open(os.path.join(latest, data_file), "r+b") as f:
        f.truncate(100)
    truncated = missing_files(latest)
    assert len(truncated) == 1 and truncated[0].startswith(f"{data_file} (truncated: 100 of "), truncated
    os.remove(os.path.join(latest, data_file))
    os.remove(os.path.join(latest, "common.pt"))
    assert missing_files(latest) == ["common.pt", data_file]
    with pytest.raises(FileNotFoundError) as e:
        resolve_iteration(root)
    assert str(e.value) == (f"--load {root}: iteration 4 (named by latest_checkpointed_iteration.txt) is incomplete, "
                            f"missing common.pt, {data_file}; the latest complete one is iteration 2: add "
                            "--load-iteration 2 to resume from it")
    assert resolve_iteration(root, 2) == 2  # loaded only when asked for
    with pytest.raises(FileNotFoundError, match=r"--load-iteration 4: incomplete, .*complete iterations there: \[2\]"):
        resolve_iteration(root, 4)
    # Through the command's checks: one line, before any rank starts.
    problems = _problems(demo_data, "--load", root)
    assert problems == [str(e.value)], problems
    assert _problems(demo_data, "--load", root, "--ckpt-step", "2", "--no-load-optim") == []


def test_init_hf_pickle_is_refused_before_any_rank(demo_data, tiny_hf_dir, tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), evil / "config.json")
    torch.save({"model.embed_tokens.weight": Payload()}, evil / "pytorch_model.bin")
    problems = _only(_problems(demo_data, "--init-hf", str(evil)), "--init-hf")
    assert len(problems) == 1 and "pytorch_model.bin" in problems[0] and "refus" in problems[0], problems
    assert not (tmp_path / "pwned").exists(), "the payload ran"


@pytest.mark.timeout(300)
def test_command_prints_every_problem_on_its_own_line(demo_data):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vita", "train", "--recipe", RECIPE, "--data-root", demo_data, "--stage", "1",
         "--tensor-model-parallel-size", "3", "--global-batch-size", "0", "--lr", "-1e-3", "--train-iters", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=280, env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("megatron-vita train: error: --") for line in lines), lines
    for flag in ("--train-iters -1", "--global-batch-size 0", "--lr -0.001", "--tensor-model-parallel-size 3"):
        assert any(line.startswith(f"megatron-vita train: error: {flag}") for line in lines), (flag, lines)
    assert len(lines) == 7, lines  # 3 values + TP 3 against heads, KV groups, ViT heads, MLP widths
    assert "iteration" not in proc.stdout  # no rank started


@pytest.mark.timeout(900)
def test_export_hf_under_torchrun(demo_data, tmp_path):
    """Two torchrun processes train at TP=2 for one iteration and save; rank 0 then exports, once every
    rank left the process group: exactly the tensors a conversion of the saved checkpoint gives."""
    from megatron_vita.checkpoint.convert import convert
    from megatron_vita.checkpoint.hf_format import HFSource

    save, export, reference = str(tmp_path / "run"), str(tmp_path / "hf"), str(tmp_path / "converted")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "examples/pretrain_vita.py", "--backend", "cpu", "--recipe", "data_recipes/demo.yaml",
           "--data-root", demo_data, "--stage", "1", "--tensor-model-parallel-size", "2", "--global-batch-size", "2",
           "--train-iters", "1", "--num-workers", "1", "--save", save, "--export-hf", export]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=850,
                          env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"> HF export: {export}") == 1, proc.stdout[-3000:]  # rank 0 only

    convert(save, reference, src_format="megatron", dst_format="hf", progress=False, log=lambda *a: None)
    got, want = HFSource(export), HFSource(reference)
    try:
        got.check()
        assert sorted(got.weight_map) == sorted(want.weight_map)
        for name in want.weight_map:
            assert torch.equal(got.read(name), want.read(name)), name
    finally:
        got.close()
        want.close()
