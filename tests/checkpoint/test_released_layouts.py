"""Checkpoints in the released Megatron layouts, sliced by hand from a HF checkpoint, convert back.

The MindSpeed TP8 layout and the TransformerEngine-named layout are written by
ckpttest_lib.released_state_dicts from longvita.md's description (plain torch.save, not the
converter). Converting them to HF must give the tensors they were sliced from, and the same
logits (text, image+text, video+text) through transformers.
"""
import pytest
from ckpttest_lib import assert_same_tensors, hf_tensors, released_state_dicts, write_released

from megatron_vita.checkpoint.convert import convert
from megatron_vita.checkpoint.verify import build_inputs, compare, hf_logits
from megatron_vita.config.model import ModelConfig


def _same_logits(ref_dir, out_dir):
    cfg = ModelConfig.from_hf_dir(ref_dir)
    inputs = build_inputs(cfg, max_tiles=3, max_frames=2)
    ref, got = hf_logits(ref_dir, inputs), hf_logits(out_dir, inputs)
    for inp, a, b in zip(inputs, ref, got):
        s = compare(a, b)
        assert s["cosine"] >= 0.9999 and s["top1"] == 100.0 and s["max_abs"] == 0.0, (inp.name, s)


def test_released_mindspeed_tp8_converts_to_hf(wide_hf_dir, wide_tensors, tmp_path):
    from megatron_vita.checkpoint.legacy_format import LegacySource

    cfg = ModelConfig.from_hf_dir(wide_hf_dir)
    root = write_released(str(tmp_path / "mindspeed_tp8"), released_state_dicts(wide_tensors, cfg, 8, te_names=False))
    src = LegacySource(root, cfg)
    assert (src.naming, src.layout.tp, src.layout.pp, src.iteration) == ("mindspeed", 8, 1, 1)
    # Released weights carry no model config: the converter says how to give one.
    with pytest.raises(ValueError, match="--model"):
        convert(root, str(tmp_path / "nope"), "megatron", "hf", progress=False, log=lambda *a: None)
    convert(root, str(tmp_path / "hf"), "megatron", "hf", model=wide_hf_dir, progress=False, log=lambda *a: None)
    assert_same_tensors(wide_tensors, hf_tensors(tmp_path / "hf"))
    _same_logits(wide_hf_dir, str(tmp_path / "hf"))


@pytest.mark.parametrize("vit_te_names", [True, False], ids=["te-everywhere", "te-llm-only"])
def test_released_te_layout_converts_to_hf(vit_te_names, tiny_hf_dir, tiny_tensors, tmp_path):
    from megatron_vita.checkpoint.legacy_format import LegacySource

    cfg = ModelConfig.from_hf_dir(tiny_hf_dir)
    ranks = released_state_dicts(tiny_tensors, cfg, 2, te_names=True, vit_te_names=vit_te_names)
    for sd in ranks:
        del sd["unused"]  # the TE-named release has no dummy
    root = write_released(str(tmp_path / "te_tp2"), ranks)
    assert LegacySource(root, cfg).naming == "te"
    convert(root, str(tmp_path / "hf"), "megatron", "hf", model=tiny_hf_dir, progress=False, log=lambda *a: None)
    assert_same_tensors(tiny_tensors, hf_tensors(tmp_path / "hf"))
    _same_logits(tiny_hf_dir, str(tmp_path / "hf"))
