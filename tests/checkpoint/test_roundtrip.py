"""HF -> Megatron -> HF is bit-exact for every format, naming and layout; Megatron -> Megatron too.

Pure tensor conversion in this process (no megatron process groups). Outputs are read back by
independent readers: the safetensors library for HF, plain `torch.load(weights_only=True)` for
legacy rank files. TP4 and TP8 use the `wide` tiny model (8 KV groups): the tiny model's 2 KV
groups cannot be split 4 ways, which the converter refuses (checked below). Written files get
the mode open() gives any new file (0o666 less the umask), shards included: the safetensors
library creates its files 0600, and the converter's own writer used to hard-code 0644.
"""
import argparse
import os
import shutil
import stat

import pytest
import torch
from ckpttest_lib import assert_same_tensors, hf_tensors, layout, split_of

from megatron_vita.checkpoint.convert import convert
from megatron_vita.hf.tiny import create_tiny


def quiet(*_):
    pass


def run(src, dst, frm, to, **kw):
    return convert(str(src), str(dst), frm, to, progress=False, log=quiet, **kw)


LAYOUTS_TINY = [layout(1, 1), layout(2, 1), layout(1, 2), layout(2, 2), layout(1, 2, vpp=2),
                layout(2, 2, first=3, last=1)]
LAYOUTS_WIDE = [layout(4, 1), layout(4, 2), layout(4, 2, vpp=2)]


def load_rank_files(root):
    """{(rank dir, key): tensor} of a legacy checkpoint, with plain torch.load (weights_only)."""
    out, meta = {}, {}
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        it = os.path.join(root, f"iter_{int(f.read()):07d}")
    for rank in sorted(os.listdir(it)):
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(os.path.join(it, rank, "model_optim_rng.pt"), weights_only=True)
        meta[rank] = obj
        for mk in [k for k in obj if k.startswith("model") and k != "model_config"]:
            for k, v in obj[mk].items():
                out[(rank, mk, k)] = v
    return out, meta


@pytest.mark.parametrize("names", ["mcore", "mindspeed", "te"])
@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_hf_to_megatron_to_hf_is_bit_exact(fmt, names, tiny_hf_dir, wide_hf_dir, tiny_tensors, wide_tensors,
                                           tmp_path):
    from megatron_vita.checkpoint.dist_format import DistSource
    from megatron_vita.checkpoint.legacy_format import LegacySource

    cases = [(tiny_hf_dir, tiny_tensors, lay) for lay in LAYOUTS_TINY]
    cases += [(wide_hf_dir, wide_tensors, lay) for lay in LAYOUTS_WIDE]
    for k, (src, tensors, lay) in enumerate(cases):
        mg, back = tmp_path / f"mg{k}", tmp_path / f"hf{k}"
        run(src, mg, "hf", "megatron", megatron_format=fmt, names=names, layout=lay)
        if fmt == "legacy":
            read = LegacySource(str(mg))
            got = split_of(read.layout)
            assert got == split_of(lay), (lay, got)
            assert len(os.listdir(read.iter_dir)) == lay.tp * lay.pp
        else:
            read = DistSource(str(mg))
        assert read.naming == names
        run(mg, back, "megatron", "hf")
        assert_same_tensors(tensors, hf_tensors(back))
        shutil.rmtree(mg)
        shutil.rmtree(back)


def test_legacy_files_hold_the_released_structure(tiny_hf_dir, tiny_tensors, tmp_path):
    """mindspeed names, TP2 PP2 VPP2: chunk-local layer numbers, row splits, dummy, args, version."""
    run(tiny_hf_dir, tmp_path / "mg", "hf", "megatron", megatron_format="legacy", names="mindspeed",
        layout=layout(2, 2, vpp=2), iteration=7)
    pieces, meta = load_rank_files(str(tmp_path / "mg"))
    assert sorted(meta) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    m = meta["mp_rank_01_001"]
    assert m["checkpoint_version"] == 3.0 and m["iteration"] == 7
    assert m["args"].tensor_model_parallel_size == 2 and m["args"].virtual_pipeline_model_parallel_size == 2
    # Chunks in Megatron order vp * pp + pp_rank: (vp1, pp1) holds global layer 3 as local layer 0.
    f = tiny_tensors["model.layers.3.mlp.down_proj.weight"]
    assert torch.equal(pieces[("mp_rank_01_001", "model1", "decoder.layers.0.mlp.linear_fc2.weight")],
                       f[:, f.shape[1] // 2:])
    gate, up = tiny_tensors["model.layers.2.mlp.gate_proj.weight"], tiny_tensors["model.layers.2.mlp.up_proj.weight"]
    h = gate.shape[0] // 2
    assert torch.equal(pieces[("mp_rank_00_000", "model1", "decoder.layers.0.mlp.linear_fc1.weight")],
                       torch.cat([gate[:h], up[:h]]))
    emb = tiny_tensors["model.embed_tokens.weight"]
    assert torch.equal(pieces[("mp_rank_01_000", "model0", "embedding.word_embeddings.weight")], emb[emb.shape[0] // 2:])
    assert ("mp_rank_00_001", "model0", "embedding.word_embeddings.weight") not in pieces
    assert torch.equal(pieces[("mp_rank_00_000", "model0", "unused")], torch.zeros(emb.shape[1]))
    assert ("mp_rank_00_001", "model0", "output_layer.weight") not in pieces  # head on the last chunk (vp1)
    assert ("mp_rank_00_001", "model1", "output_layer.weight") in pieces
    assert any(k[2].startswith("external_feature_model.vit.decoder.layers.1.") for k in pieces)


def test_megatron_to_megatron_resharding_is_bit_exact(wide_hf_dir, wide_tensors, tmp_path):
    """A chain of reshardings across formats and namings; each step equals a direct HF conversion."""
    from megatron_vita.checkpoint.dist_format import DistSource

    chain = [dict(megatron_format="legacy", names="mindspeed", layout=layout(8, 1)),
             dict(megatron_format="torch_dist", names="mcore", layout=layout(2, 2)),
             dict(megatron_format="legacy", names="te", layout=layout(1, 2, vpp=2)),
             dict(megatron_format="legacy", names="mcore", layout=layout(2, 2, first=1, last=3)),
             dict(megatron_format="torch_dist", names="te", layout=layout(4, 1))]
    prev = None
    for k, step in enumerate(chain):
        out, direct = tmp_path / f"step{k}", tmp_path / f"direct{k}"
        if prev is None:
            run(wide_hf_dir, out, "hf", "megatron", **step)
        else:
            run(prev, out, "megatron", "megatron", **step)
        run(wide_hf_dir, direct, "hf", "megatron", **step)
        if step["megatron_format"] == "legacy":
            a, _ = load_rank_files(str(out))
            b, _ = load_rank_files(str(direct))
            assert sorted(a) == sorted(b)
            assert all(torch.equal(a[key], b[key]) for key in a), step
        else:
            a, b = DistSource(str(out)), DistSource(str(direct))
            assert sorted(a.tensors) == sorted(b.tensors)
            for key, md in a.tensors.items():
                region = ([0] * len(md.size), list(md.size))
                assert torch.equal(a.read_region(key, *region), b.read_region(key, *region)), key
        if prev is not None:
            shutil.rmtree(prev)
        prev = out
    run(prev, tmp_path / "back", "megatron", "hf")
    assert_same_tensors(wide_tensors, hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_vocab_padding_is_zero_rows_dropped_on_export(fmt, tiny_hf_dir, tiny_tensors, tmp_path):
    from megatron_vita.checkpoint.dist_format import DistSource

    # 512 rows padded to a multiple of 100 x TP2 = 600: pieces of 300 rows, the last 88 zeros.
    run(tiny_hf_dir, tmp_path / "mg", "hf", "megatron", megatron_format=fmt, layout=layout(2, divisor=100))
    emb = tiny_tensors["model.embed_tokens.weight"]
    if fmt == "legacy":
        pieces, meta = load_rank_files(str(tmp_path / "mg"))
        p0 = pieces[("mp_rank_00", "model", "language_model.embedding.word_embeddings.weight")]
        p1 = pieces[("mp_rank_01", "model", "language_model.embedding.word_embeddings.weight")]
        assert meta["mp_rank_00"]["args"].padded_vocab_size == 600
    else:
        src = DistSource(str(tmp_path / "mg"))
        full = src.read_region("language_model.embedding.word_embeddings.weight", [0, 0], [600, emb.shape[1]])
        p0, p1 = full[:300], full[300:]
    assert p0.shape == p1.shape == (300, emb.shape[1])
    assert torch.equal(p0, emb[:300]) and torch.equal(p1[:212], emb[300:]) and not p1[212:].any()
    run(tmp_path / "mg", tmp_path / "back", "megatron", "hf")
    assert_same_tensors(tiny_tensors, hf_tensors(tmp_path / "back"))


def test_dtype_cast_and_bin_source(tiny_hf_dir, tiny_tensors, tmp_path):
    """A `.bin` HF source converts like safetensors; --dtype bf16 casts every tensor and the config."""
    import json

    src = tmp_path / "bin_hf"
    src.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), src / "config.json")
    torch.save(dict(tiny_tensors), src / "pytorch_model.bin")
    run(src, tmp_path / "mg", "hf", "megatron", megatron_format="legacy", layout=layout(2), dtype="bf16")
    run(tmp_path / "mg", tmp_path / "back", "megatron", "hf")
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in tiny_tensors.items()}, hf_tensors(tmp_path / "back"))
    assert json.load(open(tmp_path / "back" / "config.json"))["dtype"] == "bfloat16"


def test_tp_above_kv_groups_is_refused(tiny_hf_dir, tmp_path):
    with pytest.raises(ValueError, match="KV groups"):
        run(tiny_hf_dir, tmp_path / "mg", "hf", "megatron", layout=layout(4))
    assert not (tmp_path / "mg").exists()


@pytest.fixture
def umask_002():
    """A group-writable umask: 0o664 files, which neither 0600 nor a hard-coded 0644 gives."""
    previous = os.umask(0o002)
    try:
        yield 0o664
    finally:
        os.umask(previous)


def _modes(path):
    return {name: stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) for name in os.listdir(path)}


def test_shards_get_the_same_mode_as_the_config_files(tmp_path, umask_002):
    tiny = create_tiny(str(tmp_path / "tiny"))
    modes = _modes(tiny)
    assert sum(name.endswith(".safetensors") for name in modes) >= 2
    assert set(modes.values()) == {umask_002}, modes
    out = tmp_path / "hf"
    convert(tiny, str(out), "hf", "hf", max_shard_size=1 << 20, progress=False, log=lambda *a: None)
    modes = _modes(out)
    assert sum(name.endswith(".safetensors") for name in modes) >= 2
    assert set(modes.values()) == {umask_002}, modes


def test_create_tiny_again_leaves_no_stale_shards(tmp_path):
    out = str(tmp_path / "tiny")
    create_tiny(out, max_shard_size=300_000)
    many = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    (tmp_path / "tiny" / "notes.txt").write_text("mine")
    create_tiny(out)
    few = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(many) > len(few) >= 2
    assert sorted(os.listdir(out)) == sorted(few + ["config.json", "generation_config.json",
                                                    "model.safetensors.index.json", "notes.txt"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_shard_kind_and_transform_is_consistent(tp):
    """Each entry of the tensor_kinds tables, whatever it is: the pieces have `piece_shape`, and
    `unshard`, `place` and the stored `regions` (cut from the full tensor) all give back the full
    tensor; every transform's `to_hf` inverts `to_mcore`, and `row_segments` name its rows."""
    from megatron_vita.checkpoint.tensor_kinds import SHARD_KINDS, TRANSFORMS

    gen = torch.Generator().manual_seed(tp)
    vocab, padded = 13, 16  # 13 rows padded to a multiple of 4 x TP
    for name, kind in SHARD_KINDS.items():
        full = torch.randn(vocab if kind.pads_vocab else 8, 8, generator=gen)
        pieces = [kind.shard(full, tp, r, padded) for r in range(tp)]
        assert all(tuple(p.shape) == kind.piece_shape(full.shape, tp, padded) for p in pieces), name
        assert torch.equal(kind.unshard(pieces[:kind.pieces_to_read(tp)], vocab), full), name
        placed = torch.full(kind.full_shape(pieces[0].shape, kind.pieces_to_read(tp), vocab), float("nan"))
        for r in range(kind.pieces_to_read(tp)):
            kind.place(placed, pieces[r], kind.pieces_to_read(tp), r)
        assert torch.equal(placed, full), name
        stored = kind.stored_shape(full.shape, padded)
        assert kind.fits(stored, full.shape) and kind.model_shape(stored, vocab) == tuple(full.shape), name
        rebuilt = torch.full(stored, float("nan"))
        for offsets, sizes in kind.regions(stored, tp):
            view = rebuilt
            for d, (o, s) in enumerate(zip(offsets, sizes)):
                view = view.narrow(d, o, s)
            view.copy_(kind.cut(full, offsets, sizes))
        assert torch.equal(rebuilt[:full.shape[0]], full) and not rebuilt[full.shape[0]:].any(), name
    # (query heads, KV groups, head dim): GQA for the LLM's q/k/v, MHA for the ViT's fused qkv.
    gqa, mha = (4, 2, 3), (4, 4, 3)
    cases = {"identity": (gqa, [(6, 5)]), "pos": (gqa, [(1, 6, 5)]), "glu": (gqa, [(6, 5), (6, 5)]),
             "qkv": (gqa, [(12, 5), (6, 5), (6, 5)]), "vit_qkv": (mha, [(36, 5)])}
    assert sorted(cases) == sorted(TRANSFORMS)
    for name, transform in TRANSFORMS.items():
        heads, shapes = cases[name]
        hf = {f"{name}.{k}": torch.randn(shape, generator=gen) for k, shape in enumerate(shapes)}
        full = transform.to_mcore(list(hf.values()), heads)
        back = transform.to_hf(list(hf), full, heads)
        assert list(back) == list(hf) and all(torch.equal(back[n], hf[n]) for n in hf), name
        segments = transform.row_segments(list(hf), heads)
        if segments is not None:
            rows = [hf[n][start:start + (hf[n].shape[0] if count < 0 else count)] for n, start, count in segments]
            assert torch.equal(torch.cat(rows), full), name
