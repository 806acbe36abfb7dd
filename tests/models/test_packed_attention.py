"""Packed documents: inside one packed sequence each document's logits equal transformers' Qwen2 on it alone.

The sequence is built as training builds it (`data.packing.collate_packs` with reset: position ids
restart per document, cu_seqlens close every document and the trailing padding) and runs through
the same `model_inputs` -> PackedSeqParams(`thd`) path as the training forward step. Documents of
different odd lengths, one of a single token; the reference is transformers' own
`Qwen2ForCausalLM` holding the same weights (loaded into megatron through the project's mapping),
run on each document separately. At TP1 (as DP2), TP2 and TP2 + sequence parallel, fp32, real
gloo ranks.

A control in the same run shows the comparison can tell packing from no packing: without
cu_seqlens, documents after the first attend to earlier ones and miss the reference by far more
than the tolerance.
"""
import numpy as np
import pytest
import torch

from mv_testlib import checkpoint_weights_with, qwen2_reference, spawn, text_ids

DOC_LENGTHS = (9, 1, 13, 5)  # 28 tokens, then 4 of padding: its own cu_seqlens segment
SEQ_LENGTH = 32
TOLERANCE = 1e-4  # fp32, as the other comparisons with transformers' Qwen2
CONTROL_MARGIN = 1e-2  # how far cross-document attention must move logits for the test to be meaningful


def packed_documents(cfg, seed: int = 5):
    """(documents' token lists, the packed training batch) for DOC_LENGTHS."""
    from megatron_vita.data.packing import collate_packs

    gen = torch.Generator().manual_seed(seed)
    docs = [text_ids(cfg, n, gen) for n in DOC_LENGTHS]
    no_tiles = np.zeros((0, cfg.vision.image_size, cfg.vision.image_size, 3), dtype=np.uint8)
    rows = [[(ids, ids[1:] + [-100], no_tiles) for ids in docs]]
    batch = collate_packs(rows, SEQ_LENGTH, pad_id=0, reset=True, num_image_token=cfg.num_image_token,
                          context_ids=cfg.tokens.context_ids, image_size=cfg.vision.image_size,
                          with_cu_seqlens=True)
    return docs, batch


def _rank(rank, world, hf_dir):
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.pipeline import forward_only
    from megatron_vita.parallel.state import parallel_layout

    cfg = ModelConfig.from_hf_dir(hf_dir)
    qwen2 = qwen2_reference(cfg)
    weights = checkpoint_weights_with(hf_dir, qwen2.state_dict())
    docs, batch = packed_documents(cfg)
    with torch.no_grad():
        refs = [qwen2(input_ids=torch.tensor([ids])).logits[0] for ids in docs]
    unpacked = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    report = {"cu_seqlens": batch["cu_seqlens"].tolist()}
    layouts = {"tp1": {}, "tp2": dict(tensor_model_parallel_size=2),
               "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}
    for name, layout in layouts.items():
        par = ParallelConfig(**layout)
        with parallel_layout(par):
            model = build_model_chunks(cfg, par)[0]
            load_hf_weights([model], weights, cfg, par)
            packed = forward_only([model], [batch])[0][0]
            control = forward_only([model], [unpacked])[0][0]
        diffs, control_diffs, start = [], [], 0
        for ids, ref in zip(docs, refs):
            end = start + len(ids)
            diffs.append((packed[start:end] - ref).abs().max().item())
            control_diffs.append((control[start:end] - ref).abs().max().item())
            start = end
        report[name] = dict(doc_diffs=diffs, control_diffs=control_diffs)
    return report


@pytest.mark.timeout(420)
def test_packed_documents_match_qwen2_on_each_document_alone(tiny_hf_dir):
    reports = spawn(_rank, 2, tiny_hf_dir, timeout=400)
    for rank, report in enumerate(reports):
        # As training packs: one segment per document, then the padding's.
        assert report.pop("cu_seqlens") == [0, 9, 10, 23, 28, 32], report
        assert set(report) == {"tp1", "tp2", "tp2_sp"}
        for layout, r in report.items():
            where = f"rank {rank} {layout}: per-document max |diff| {r['doc_diffs']}"
            assert len(r["doc_diffs"]) == len(DOC_LENGTHS)
            assert max(r["doc_diffs"]) <= TOLERANCE, where
            # The first document sees nothing before it either way; every later one would.
            assert r["control_diffs"][0] <= TOLERANCE, (where, r["control_diffs"])
            assert min(r["control_diffs"][1:]) > CONTROL_MARGIN, (where, r["control_diffs"])
