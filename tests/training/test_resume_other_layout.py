"""--load at another parallel layout: weights reshard; the optimizer state is refused clearly.

A TP=2 run saves; resuming it at PP=2 with its optimizer state fails in one line that names the
changed flags and the fix; with --no-load-optim it continues from the saved iteration and data
position, with the trained weights (its first loss is the TP=2 run's next loss's neighbour, far
below a fresh start's).
"""
import json
import os
import subprocess
import sys

RECIPE = ["--recipe", "data_recipes/demo.yaml", "--stage", "2", "--lr", "1e-3", "--global-batch-size", "2",
          "--num-workers", "1"]


def _train(repo, data, *flags):
    return subprocess.run([sys.executable, "-m", "megatron_vita", "train", "--data-root", data, *RECIPE, *flags],
                          cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})


def _losses(path):
    with open(path) as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, f)}


def test_resume_at_another_layout(demo_data, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    save, fresh = str(tmp_path / "run"), str(tmp_path / "fresh")
    first = _train(repo, demo_data, "--tensor-model-parallel-size", "2", "--train-iters", "6", "--save", save,
                   "--metrics-file", save + "/a.jsonl")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _train(repo, demo_data, "--pipeline-model-parallel-size", "2", "--train-iters", "8", "--load", save)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--pipeline-model-parallel-size 1 -> 2" in refused.stderr and "--no-load-optim" in refused.stderr
    resumed = _train(repo, demo_data, "--pipeline-model-parallel-size", "2", "--train-iters", "8", "--load", save,
                     "--no-load-optim", "--save", save, "--metrics-file", save + "/b.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "start iteration 6" in resumed.stdout
    scratch = _train(repo, demo_data, "--pipeline-model-parallel-size", "2", "--train-iters", "2", "--save", fresh,
                     "--metrics-file", fresh + "/c.jsonl")
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    trained, continued, from_scratch = _losses(save + "/a.jsonl"), _losses(save + "/b.jsonl"), _losses(fresh + "/c.jsonl")
    assert sorted(continued) == [7, 8]
    assert continued[7] < from_scratch[1] - 0.5, (continued, from_scratch)
    assert abs(continued[7] - trained[6]) < 1.0, (continued, trained)
