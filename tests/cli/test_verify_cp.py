"""`megatron-vita verify` at context parallelism: transformers against megatron-core at TP x PP x CP.

The inputs are made long with --seq-length, so that each one (text, image+text, video+text)
covers all 2*CP chunks of the load-balanced split and every medium has a tile whose feature
tokens fall in two chunks (two CP ranks run it); the length is not a multiple of 2*CP, so the
split pads. Ring at CP 2 with a real PNG and MP4, and Ulysses at TP 2 x CP 2 with the Megatron
spellings and MindSpeed's algorithm name (2 query / 1 KV head per TP rank: the KV-head repeat
path), go through the CLI's entry point in the test process (the ranks it spawns are real gloo
processes); a Megatron checkpoint with one layer's weights perturbed FAILS verify() at CP 2, so
the comparison can fail. Bad CP layouts are refused in one line each before anything runs.
"""
import glob
import os
import re
import shutil

import pytest
import torch

from mv_testlib import write_mp4, write_png

LAST_LINE = re.compile(r"^verify: cosine=(?P<cos>[0-9.]+) max_abs=(?P<abs>[0-9.e+-]+) top1=(?P<top1>[0-9.]+)%$")
SEQ = 99  # not a multiple of 2*CP = 4: the split pads the last chunk


def _verify(capsys, monkeypatch, *args):
    """The CLI's entry point in this process (the ranks it spawns are real processes): (rc, stdout, stderr)."""
    from megatron_vita.cli import main
    from megatron_vita.platform import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "cpu")  # main() exports the backend for its ranks; restored afterwards
    rc = main(["verify", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _summary(out, err):
    lines = out.strip().splitlines()
    m = LAST_LINE.match(lines[-1]) if lines else None
    assert m, f"last line is not the verify summary:\n{out}\n{err}"
    return lines, float(m["cos"]), float(m["abs"]), float(m["top1"])


def _spans_every_chunk(cfg, inp, cp: int):
    """(every chunk of the 2*CP split holds real tokens, some tile's feature tokens lie in two chunks)."""
    from megatron_vita.models.common.visual_tokens import context_token_indices
    from megatron_vita.parallel.context.batch import batch_layout

    layout = batch_layout({"tokens": inp.input_ids}, cp, 2 * cp)
    chunk = layout.chunk_sizes[0]
    covered = {p // chunk for p in range(inp.input_ids.shape[1])} == set(range(2 * cp))
    if inp.pixel_values is None:
        return covered, None
    positions = context_token_indices(inp.input_ids, cfg.tokens.context_ids, cfg.num_image_token)[1]
    straddles = any(len({int(p) // chunk for p in tile}) > 1 for tile in positions)
    return covered, straddles


@pytest.mark.timeout(300)
def test_verify_cp2_ring_with_long_inputs_over_every_chunk(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    from megatron_vita.checkpoint.verify import build_inputs
    from megatron_vita.config.model import ModelConfig

    image, video = str(tmp_path / "img.png"), str(tmp_path / "clip.mp4")
    write_png(image)
    write_mp4(video)  # 12 frames: fewer than the 14 that would fill SEQ tokens
    cfg = ModelConfig.from_hf_dir(tiny_hf_dir)
    inputs = build_inputs(cfg, image, video, seq_length=SEQ)
    assert [inp.input_ids.shape[1] for inp in inputs] == [SEQ] * 3
    assert inputs[2].pixel_values.shape[0] == 12  # bounded by the frames the video has
    for inp in inputs:
        covered, straddles = _spans_every_chunk(cfg, inp, cp=2)
        assert covered and straddles is not False, (inp.name, covered, straddles)

    rc, out, err = _verify(capsys, monkeypatch, "--hf", tiny_hf_dir, "--cp", "2", "--seq-length", str(SEQ),
                           "--image", image, "--video", video)
    assert rc == 0, out + err
    lines, cos, max_abs, top1 = _summary(out, err)
    assert cos >= 0.9999 and top1 == 100.0 and max_abs < 1e-4, lines[-1]
    assert any("megatron-core at TP1 PP1 CP2 (ring) on 2 ranks" in line for line in lines), out
    for name in ("text", "image+text", "video+text"):
        assert any(re.match(rf"verify: {re.escape(name)} +positions={SEQ} ", line) for line in lines), out
    assert any(f"12 frames from {video}" in line for line in lines), out


@pytest.mark.timeout(300)
def test_verify_tp2_cp2_ulysses_megatron_spellings(tiny_hf_dir, capsys, monkeypatch):
    from megatron_vita.checkpoint.verify import build_inputs
    from megatron_vita.config.model import ModelConfig

    seq = 43  # padded to 44: chunks of 11 cut a tile of the generated image and of the generated video
    cfg = ModelConfig.from_hf_dir(tiny_hf_dir)
    for inp in build_inputs(cfg, seq_length=seq):
        covered, straddles = _spans_every_chunk(cfg, inp, cp=2)
        assert covered and straddles is not False, (inp.name, covered, straddles)

    rc, out, err = _verify(capsys, monkeypatch, "--hf", tiny_hf_dir, "--tensor-model-parallel-size", "2",
                           "--context-parallel-size", "2", "--context-parallel-algo", "ulysses_cp_algo",
                           "--seq-length", str(seq))
    assert rc == 0, out + err
    lines, cos, max_abs, top1 = _summary(out, err)
    assert cos >= 0.9999 and top1 == 100.0 and max_abs < 1e-4, lines[-1]
    assert any("megatron-core at TP2 PP1 CP2 (ulysses_cp_algo) on 4 ranks" in line for line in lines), out
    assert sum(f"positions={seq} " in line for line in lines) == 3, out


def _perturbed_checkpoint(tiny_hf_dir, out):
    """The tiny checkpoint with noise (1/4 of its own scale) on one LLM layer's o_proj."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(glob.glob(os.path.join(tiny_hf_dir, "*.safetensors"))):
        tensors.update(load_file(f))
    name = "model.layers.2.self_attn.o_proj.weight"
    w = tensors[name]
    tensors[name] = w + 0.25 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    os.makedirs(out)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(tiny_hf_dir, f), out)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.timeout(300)
def test_verify_cp2_fails_a_perturbed_megatron_checkpoint(tiny_hf_dir, tmp_path):
    from megatron_vita.checkpoint.convert import convert
    from megatron_vita.checkpoint.verify import verify

    mg = str(tmp_path / "perturbed_mg")
    convert(_perturbed_checkpoint(tiny_hf_dir, str(tmp_path / "perturbed_hf")), mg, "hf", "megatron",
            progress=False, log=lambda *a: None)
    logged = []
    summary = verify(tiny_hf_dir, megatron_dir=mg, cp=2, seq_length=SEQ, backend="cpu", log=logged.append)
    assert not summary["passed"], logged
    assert summary["cosine"] < 0.9999 and summary["top1"] < 100.0, summary
    assert any("CP2 (ring) on 2 ranks from Megatron" in line for line in logged), logged
    assert "verify: FAILED (fp32 needs cosine >= 0.9999 and top-1 >= 100%)" in logged


@pytest.mark.parametrize("flags, problems", [
    (["--tp", "2", "--cp-algo", "ulysses", "--cp", "4"],
     ["--context-parallel-algo ulysses with --context-parallel-size 4: each of the 2 tensor-parallel ranks holds "
      "4/2 = 2 query heads, which do not split over 4 Ulysses ranks; use ring, or hybrid with "
      "--ulysses-degree-in-cp 2"]),
    (["--cp", "2", "--ulysses-degree-in-cp", "2"],
     ["--ulysses-degree-in-cp 2 only applies to --context-parallel-algo hybrid (ring uses 1)"]),
    (["--cp", "0", "--seq-length", "0"],
     ["--seq-length must be >= 1 (got 0)", "--context-parallel-size must be >= 1 (got 0)"]),
    (["--candidate-hf", "{hf}", "--cp", "2"],
     ["--cp sets the megatron-core layout, but --candidate-hf runs transformers: give --megatron DIR "
      "(or drop --candidate-hf) to run megatron-core"]),
], ids=["ulysses-heads", "degree-without-hybrid", "cp0-seq0", "cp-with-hf-candidate"])
def test_verify_refuses_a_bad_cp_layout_before_any_rank(flags, problems, tiny_hf_dir, capsys, monkeypatch):
    rc, out, err = _verify(capsys, monkeypatch, "--hf", tiny_hf_dir, *[f.format(hf=tiny_hf_dir) for f in flags])
    assert rc == 1, out + err
    assert err.strip().splitlines() == [f"megatron-vita verify: error: {p}" for p in problems]
    assert "reference done" not in out and "verify: input" not in out  # refused before anything ran
