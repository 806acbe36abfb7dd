"""Failure behaviour: malicious pickles, mismatching checkpoints, overwriting, SIGKILL mid-way."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from ckpttest_lib import assert_same_tensors, hf_tensors, layout

from megatron_vita.checkpoint.convert import convert
from megatron_vita.checkpoint.safe_load import UnsafeCheckpointError


def quiet(*_):
    pass


def run(src, dst, frm, to, **kw):
    return convert(str(src), str(dst), frm, to, progress=False, log=quiet, **kw)


class Payload:
    """Unpickling this runs `touch MARKER`: proof of code execution if the marker appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(kind, tmp_path, tiny_hf_dir, marker):
    """A checkpoint of `kind` with the payload planted where a loader unpickles; returns (src, format, file)."""
    if kind == "hf-bin":
        src = tmp_path / "bin"
        src.mkdir()
        shutil.copy(os.path.join(tiny_hf_dir, "config.json"), src)
        torch.save({"model.norm.weight": torch.ones(4), "evil": Payload(marker)}, src / "pytorch_model.bin")
        return src, "hf", src / "pytorch_model.bin"
    src = tmp_path / "mg"
    fmt = "legacy" if kind == "legacy" else "torch_dist"
    run(tiny_hf_dir, src, "hf", "megatron", megatron_format=fmt)
    it = src / "iter_0000000"
    if kind == "legacy":
        target = it / "mp_rank_00" / "model_optim_rng.pt"
        obj = torch.load(target, weights_only=False)
        obj["args"].evil = Payload(marker)
        torch.save(obj, target)
    elif kind == "dist-common":
        target = it / "common.pt"
        torch.save({**torch.load(target, weights_only=False), "evil": Payload(marker)}, target)
    else:
        target = it / ".metadata"
        with open(target, "wb") as f:
            pickle.dump(Payload(marker), f)
    return src, "megatron", target


@pytest.mark.parametrize("kind", ["legacy", "dist-common", "dist-metadata", "hf-bin"])
def test_malicious_pickle_is_refused_and_never_runs(kind, tiny_hf_dir, tmp_path):
    marker = tmp_path / "payload_ran"
    src, frm, planted = _plant(kind, tmp_path, tiny_hf_dir, marker)
    # Positive control: an unrestricted unpickler does run the payload.
    with open(planted, "rb") as f:
        torch.load(f, weights_only=False) if kind != "dist-metadata" else pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        run(src, tmp_path / "out", frm, "megatron" if frm == "hf" else "hf")
    assert not marker.exists() and not (tmp_path / "out").exists()


def _missing(t):
    shape = list(t.pop("model.layers.1.mlp.up_proj.weight").shape)
    return f"missing key 'model.layers.1.mlp.up_proj.weight' (the model config expects shape {shape})"


def _unexpected(t):
    t["model.layers.1.mlp.extra.weight"] = torch.zeros(3, 5)
    return "unexpected key 'model.layers.1.mlp.extra.weight' (shape [3, 5])"


def _shape(t):
    name = "model.layers.2.self_attn.k_proj.weight"
    good = list(t[name].shape)
    t[name] = torch.zeros(good[0] // 2, good[1])
    return (f"shape mismatch for '{name}': the checkpoint has {[good[0] // 2, good[1]]}, "
            f"the model config expects {good}")


@pytest.mark.parametrize("edit", [_missing, _unexpected, _shape], ids=["missing", "unexpected", "shape"])
def test_hf_key_and_shape_errors_name_key_and_shapes(edit, tiny_hf_dir, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "edited"
    src.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), src)
    tensors = hf_tensors(tiny_hf_dir)
    message = edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        run(src, tmp_path / "out", "hf", "megatron")
    assert message in str(e.value) and str(src) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_megatron_key_shape_and_config_errors(tiny_hf_dir, wide_hf_dir, tmp_path):
    from megatron_vita.config.model import ModelConfig

    tiny, wide = ModelConfig.from_hf_dir(tiny_hf_dir).to_hf_dict(), ModelConfig.from_hf_dir(wide_hf_dir).to_hf_dict()
    key = next(k for k in sorted(tiny) if tiny[k] != wide[k])
    run(tiny_hf_dir, tmp_path / "mg", "hf", "megatron", megatron_format="legacy", names="mindspeed", layout=layout(2))
    # The checkpoint carries its config; a different --model is a config mismatch naming the fields.
    with pytest.raises(ValueError, match=r"config mismatch") as e:
        run(tmp_path / "mg", tmp_path / "out", "megatron", "hf", model=wide_hf_dir)
    assert f"{key}: checkpoint {tiny[key]!r} vs --model {wide[key]!r}" in str(e.value)
    it = tmp_path / "mg" / "iter_0000000"
    pieces = {}
    for rank in ("mp_rank_00", "mp_rank_01"):
        obj = torch.load(it / rank / "model_optim_rng.pt", weights_only=False)
        del obj["model_config"]  # like released weights: the config must come from --model
        pieces[rank] = {k: list(v.shape) for k, v in obj["model"].items()}
        if rank == "mp_rank_01":
            obj["model"].pop("decoder.layers.1.mlp.linear_fc2.weight")
            obj["model"]["decoder.layers.0.extra.weight"] = torch.zeros(2, 2)
        torch.save(obj, it / rank / "model_optim_rng.pt")
    file = it / "mp_rank_01" / "model_optim_rng.pt"
    with pytest.raises(ValueError) as e:
        run(tmp_path / "mg", tmp_path / "out", "megatron", "hf", model=wide_hf_dir)
    # Against another config, tensors mismatch: each line names the key, the file and both shapes.
    found = re.findall(r"shape mismatch for '([^']+)' in (\S+) \[model\]: the checkpoint has (\[[\d, ]+\]), "
                       r"the model config expects \[[\d, ]+\]", str(e.value))
    assert found, str(e.value)
    for key, path, have in found:
        assert str(pieces[os.path.basename(os.path.dirname(path))][key]) == have
    with pytest.raises(ValueError) as e:
        run(tmp_path / "mg", tmp_path / "out", "megatron", "hf", model=tiny_hf_dir)
    text = str(e.value)
    fc2 = pieces["mp_rank_01"]["decoder.layers.1.mlp.linear_fc2.weight"]
    assert f"missing key 'decoder.layers.1.mlp.linear_fc2.weight' in {file} [model] (expected shape {fc2})" in text
    assert f"unexpected key 'decoder.layers.0.extra.weight' (shape [2, 2]) in {file} [model]" in text
    assert not (tmp_path / "out").exists()


def test_overwrite_needs_force(tiny_hf_dir, tiny_tensors, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "megatron_vita", "convert", "--from", "hf", "--to", "megatron",
                           "--input", tiny_hf_dir, "--output", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--output {out} exists; pass --force to replace it" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "notes").mkdir()
    (out / "notes" / "run.md").write_text("mine too")
    # --force replaces what a checkpoint consists of and nothing else.
    run(tiny_hf_dir, out, "hf", "megatron", megatron_format="legacy", force=True)
    assert sorted(os.listdir(out)) == ["iter_0000000", "keep.txt", "latest_checkpointed_iteration.txt", "notes"]
    assert (out / "keep.txt").read_text() == "mine" and (out / "notes" / "run.md").read_text() == "mine too"
    with pytest.raises(ValueError, match="overlaps --input"):
        run(out, out / "inside", "megatron", "hf")
    run(out, tmp_path / "hf", "megatron", "hf")
    assert_same_tensors(tiny_tensors, hf_tensors(tmp_path / "hf"))
    # A Megatron checkpoint replaced by a HF one: the iteration directory and tracker go too.
    logged = []
    convert(str(tmp_path / "hf"), str(out), "hf", "hf", force=True, progress=False, log=logged.append,
            max_shard_size=1 << 20)
    names = sorted(os.listdir(out))
    assert "iter_0000000" not in names and "latest_checkpointed_iteration.txt" not in names
    assert {"keep.txt", "notes", "config.json", "model.safetensors.index.json"} <= set(names)
    assert any("keeping 2 entries" in line and "keep.txt, notes" in line for line in logged), logged
    assert_same_tensors(tiny_tensors, hf_tensors(out))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no partial or old directory left


def _cli_convert(src, out, *extra):
    return subprocess.run([sys.executable, "-m", "megatron_vita", "convert", "--from", "hf", "--to", "megatron",
                           "--input", str(src), "--output", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})


@pytest.mark.timeout(240)
def test_unusable_output_is_one_line_before_any_work(tiny_hf_dir, tmp_path):
    """Root ignores file modes, so the unwritable outputs here are paths that go through a file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out, why in ((blocker / "ckpt", f"{blocker} is not a directory"),
                     (blocker, "exists and is not a directory")):
        proc = _cli_convert(tiny_hf_dir, out, "--force")
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"--output {out}" in proc.stderr and why in proc.stderr, proc.stderr
        assert "convert:" not in proc.stdout  # refused before the source was even read
    assert blocker.read_text() == "x" and os.listdir(tmp_path) == ["a_file"]
    # Kernel file systems refuse new directories even to root: /proc/sys is mounted read-only
    # (refused by the up-front check), /sys says EPERM only when the partial directory is made.
    for out in ("/proc/sys/megatron_vita_test_ckpt", "/sys/megatron_vita_test_ckpt"):
        proc = _cli_convert(tiny_hf_dir, out)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"--output {out}" in proc.stderr, proc.stderr


KILLER = """
import os, signal, sys
from megatron_vita.checkpoint.convert import convert
from megatron_vita.config.parallel import ParallelConfig
count = 0
def on_tensor(name, nbytes):
    global count
    count += 1
    if count == int(sys.argv[5]):
        os.kill(os.getpid(), signal.SIGKILL)
convert(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], layout=ParallelConfig(tensor_model_parallel_size=2),
        megatron_format=sys.argv[6], progress=False,
        on_tensor=on_tensor)
"""


def test_sigkill_mid_forced_conversion_keeps_the_old_checkpoint(tiny_hf_dir, tiny_tensors, tmp_path):
    dst = tmp_path / "ckpt"
    run(tiny_hf_dir, dst, "hf", "megatron", megatron_format="legacy")
    (dst / "keep.txt").write_text("mine")
    before = {f: os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs}
    proc = subprocess.run([sys.executable, "-c", KILLER.replace("progress=False", "progress=False, force=True"),
                           tiny_hf_dir, str(dst), "hf", "megatron", "30", "torch_dist"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed while writing the replacement: the old checkpoint is untouched and still loads.
    assert {f: os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs} == before
    run(dst, tmp_path / "back", "megatron", "hf")
    assert_same_tensors(tiny_tensors, hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("target", ["legacy", "torch_dist", "hf"])
def test_sigkill_mid_conversion_leaves_nothing_valid_and_rerun_succeeds(target, tiny_hf_dir, tiny_tensors, tmp_path):
    if target == "hf":
        src, frm, to = tmp_path / "mg", "megatron", "hf"
        run(tiny_hf_dir, src, "hf", "megatron", megatron_format="legacy", layout=layout(2))
    else:
        src, frm, to = tiny_hf_dir, "hf", "megatron"
    dst = tmp_path / "out" / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(src), str(dst), frm, to, "30",
                           "legacy" if target == "hf" else target], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed after 30 of 67 tensors: the destination does not exist; only a hidden partial directory
    # is left, with no tracker / index, and readers refuse it.
    assert not dst.exists()
    left = os.listdir(tmp_path / "out")
    assert len(left) == 1 and left[0].startswith(".ckpt.partial-"), left
    partial = tmp_path / "out" / left[0]
    files = [f for _, _, fs in os.walk(partial) for f in fs]
    assert files and "latest_checkpointed_iteration.txt" not in files and "model.safetensors.index.json" not in files
    with pytest.raises((FileNotFoundError, ValueError)):
        run(partial, tmp_path / "x", "megatron" if to == "megatron" else "hf", "hf")
    # The rerun succeeds and clears the dead run's partial directory.
    run(src, dst, frm, to, layout=layout(2), megatron_format="legacy" if target == "hf" else target)
    assert os.listdir(tmp_path / "out") == ["ckpt"]
    back = dst if to == "hf" else tmp_path / "back"
    if to == "megatron":
        run(dst, back, "megatron", "hf")
    assert_same_tensors(tiny_tensors, hf_tensors(back))
    assert json.load(open(back / "model.safetensors.index.json"))["weight_map"]
