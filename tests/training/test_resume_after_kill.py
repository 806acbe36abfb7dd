"""kill -9 a 2-process training run mid-way, resume with --load: the rest is identical.

The run is the real command (`megatron-vita train` over gloo, checkpoints every 2 iterations) at
context parallel 2 (ring) with the distributed optimizer, whose state is sharded over DP x CP:
each rank trains its load-balanced half of every sequence and saves its own optimizer shard. A second, uninterrupted run gives the reference. After the resume every later
iteration must have exactly the same loss (CPU fp32, bit for bit), consumed exactly the same
samples (dataset, record) as the uninterrupted run (none lost, none repeated), and count the
consumed samples on from the checkpoint's count, as Megatron-LM does.

Then the latest iteration loses a data file (a half-copied checkpoint): `--load` refuses before
any rank starts, naming the file and the earlier complete iteration, which `--load-iteration`
resumes from, again exactly.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from megatron_vita.config.parallel import ConfigError
from megatron_vita.training import config as train_config
from megatron_vita.training.cli import build_config

ITERS = 6  # checkpoints at 2 and 4 (and 6); the kill lands after iteration 3 or 4


def _train_cmd(data, save, metrics, *extra):
    return [sys.executable, "-m", "megatron_vita", "train", "--recipe", "data_recipes/demo.yaml",
            "--data-root", data, "--stage", "1", "--context-parallel-size", "2", "--use-distributed-optimizer",
            "--global-batch-size", "4",
            "--train-iters", str(ITERS), "--save-interval", "2", "--save", save, "--metrics-file", metrics,
            "--num-workers", "1", *extra]


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_config.add_arguments(parser)
    return parser.parse_args(argv)


def _read(metrics):
    out = {}
    with open(metrics) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["iteration"]] = rec  # a resumed run re-logs the iterations after its checkpoint
    return out


def _lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


@pytest.mark.timeout(1800)
def test_kill_and_resume_is_exact(demo_data, tmp_path):
    env = {**os.environ, "MEGATRON_VITA_BACKEND": "cpu"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ref = str(tmp_path / "ref")
    subprocess.run(_train_cmd(demo_data, ref, ref + "/metrics.jsonl"), cwd=repo, env=env, check=True,
                   capture_output=True, timeout=600)
    reference = _read(ref + "/metrics.jsonl")
    assert sorted(reference) == list(range(1, ITERS + 1))

    run = str(tmp_path / "run")
    metrics = run + "/metrics.jsonl"
    kill_after = random.Random().randint(3, ITERS - 2)
    proc = subprocess.Popen(_train_cmd(demo_data, run, metrics), cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while _lines(metrics) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
    proc.wait(timeout=60)
    killed_at = _lines(metrics)
    assert kill_after <= killed_at < ITERS, f"run ended before it could be killed ({killed_at} iterations)"
    latest = int(open(os.path.join(run, "latest_checkpointed_iteration.txt")).read())
    assert latest <= killed_at and latest % 2 == 0 and os.path.isdir(os.path.join(run, f"iter_{latest:07d}"))

    resumed = subprocess.run(_train_cmd(demo_data, run, metrics, "--load", run), cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"start iteration {latest}" in resumed.stdout
    got = _read(metrics)
    for it in range(1, ITERS + 1):
        assert got[it]["loss"] == reference[it]["loss"], (it, got[it]["loss"], reference[it]["loss"], killed_at)
        assert got[it]["samples"] == reference[it]["samples"], f"iteration {it}: different samples"
        assert got[it]["consumed_samples"] == reference[it]["consumed_samples"], (it, got[it], reference[it])
    assert all(got[it]["samples"] for it in got), "metrics must record the consumed samples"
    # An interrupted save leaves only a hidden partial directory, which the next save clears.
    assert not [d for d in os.listdir(run) if d.startswith(".iter_")]

    # A half-written latest iteration: refused in one line by the checks made before any rank starts ...
    last = os.path.join(run, f"iter_{ITERS:07d}")
    lost = sorted(f for f in os.listdir(last) if f.endswith(".distcp"))[-1]
    os.remove(os.path.join(last, lost))
    flags = [os.path.join(repo, a) if a.startswith("data_recipes/") else a
             for a in _train_cmd(demo_data, run, metrics, "--load", run)[4:]]
    with pytest.raises(ConfigError) as refused:
        build_config(_parse(flags), world_size=2)
    assert refused.value.problems == [
        f"--load {run}: iteration {ITERS} (named by latest_checkpointed_iteration.txt) is incomplete, missing {lost}; "
        f"the latest complete one is iteration {ITERS - 2}: add --load-iteration {ITERS - 2} to resume from it"]
    # ... and the earlier complete one is resumed from when asked for.
    again = run + "/again.jsonl"
    redo = subprocess.run(_train_cmd(demo_data, run, again, "--load", run, "--load-iteration", str(ITERS - 2)),
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
    assert f"start iteration {ITERS - 2}" in redo.stdout
    redone = _read(again)
    assert sorted(redone) == [ITERS - 1, ITERS]
    for it in redone:
        assert redone[it]["loss"] == reference[it]["loss"] and redone[it]["samples"] == reference[it]["samples"]
        assert redone[it]["consumed_samples"] == reference[it]["consumed_samples"]
