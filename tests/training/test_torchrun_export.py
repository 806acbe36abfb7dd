"""`--export-hf` under torchrun (the launcher the example scripts use) writes the HF export too.

Two torchrun processes train the tiny model at TP=2 for one iteration and save; rank 0 then
exports, once every rank left the process group. The export must hold exactly the tensors a
conversion of the saved checkpoint gives (the final weights, in the HF layout).
"""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(900)
def test_export_hf_under_torchrun(demo_data, tmp_path):
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
