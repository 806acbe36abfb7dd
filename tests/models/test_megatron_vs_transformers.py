"""The megatron-core Long-VITA against transformers' own modules, at TP=1 (DP=2) and TP=2.

- language part vs transformers' Qwen2ForCausalLM holding the same weights;
- vision tower vs transformers' InternVLVisionModel holding the same weights (q/k/v are
  separate there and fused here, lambda_1/2 are ls1/ls2), at the native image size and at a
  size that needs position-embedding interpolation;
- the whole model vs this project's HF LongVITAForCausalLM on text, image+text and
  video+text batches (batch of 2: one sample with three tiles, one with none / two frames);
- packed documents: inside one packed sequence each document's logits equal Qwen2ForCausalLM
  run on that document alone (at TP1, TP2, TP2 + sequence parallel, and context parallel 2 with
  ring and Ulysses attention: each document split into 2*CP chunks over the ranks, also packed
  the way the loader packs under CP, each document padded in place). The sequence is built as
  training builds it (`data.packing.collate_packs` with reset: position ids restart per document,
  cu_seqlens close every document and the trailing padding) and runs through the training
  forward step's `model_inputs` -> PackedSeqParams(`thd`). Documents of different odd lengths,
  one of a single token. A control in the same run shows the comparison can tell packing from
  no packing: without cu_seqlens, documents after the first attend to earlier ones and miss the
  reference by far more than the tolerance.
All in fp32 on real gloo process groups; one spawned group serves every test here.
"""
import numpy as np
import pytest
import torch

from mv_testlib import (checkpoint_weights_with, collate, multimodal_batch, qwen2_reference, randomize_params, spawn,
                        text_ids)

DOC_LENGTHS = (9, 1, 13, 5)  # 28 tokens, then 4 of padding: its own cu_seqlens segment
SEQ_LENGTH = 32
QWEN2_TOLERANCE = 1e-4  # fp32
CONTROL_MARGIN = 1e-2  # how far cross-document attention must move logits for the packed test to mean anything


def _internvl_vision(cfg):
    from transformers import InternVLVisionConfig, InternVLVisionModel

    v = cfg.vision
    vcfg = InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
        intermediate_size=v.ffn_hidden_size, image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
        layer_norm_eps=v.layernorm_epsilon, attention_bias=True, use_qk_norm=False, use_mean_pooling=True,
        use_absolute_position_embeddings=True, norm_type="layer_norm", hidden_act="gelu")
    model = InternVLVisionModel(vcfg).eval()
    randomize_params(model, seed=2)
    return model


def _internvl_to_long_vita_names(sd):
    """transformers' InternVL vision names -> the released Long-VITA HF names."""
    out = {
        "model.vision_model.embeddings.class_embedding": sd["embeddings.cls_token"],
        "model.vision_model.embeddings.position_embedding": sd["embeddings.position_embeddings"],
        "model.vision_model.embeddings.patch_embedding.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "model.vision_model.embeddings.patch_embedding.bias": sd["embeddings.patch_embeddings.projection.bias"],
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n_layers):
        src, dst = f"encoder.layer.{i}.", f"model.vision_model.encoder.layers.{i}."
        for wb in ("weight", "bias"):
            out[dst + f"attn.qkv.{wb}"] = torch.cat([sd[src + f"attention.{p}_proj.{wb}"] for p in "qkv"])
            out[dst + f"attn.proj.{wb}"] = sd[src + f"attention.projection_layer.{wb}"]
            out[dst + f"norm1.{wb}"] = sd[src + f"layernorm_before.{wb}"]
            out[dst + f"norm2.{wb}"] = sd[src + f"layernorm_after.{wb}"]
            out[dst + f"mlp.fc1.{wb}"] = sd[src + f"mlp.fc1.{wb}"]
            out[dst + f"mlp.fc2.{wb}"] = sd[src + f"mlp.fc2.{wb}"]
        out[dst + "ls1"] = sd[src + "lambda_1"]
        out[dst + "ls2"] = sd[src + "lambda_2"]
    return out


def _modules(hf_dir):
    from transformers import AutoModelForCausalLM

    from megatron_vita.checkpoint.hf_format import HFSource
    from megatron_vita.checkpoint.model_io import load_hf_weights
    from megatron_vita.config import ModelConfig, ParallelConfig
    from megatron_vita.models.long_vita.builder import build_model_chunks
    from megatron_vita.parallel.pipeline import forward_only
    from megatron_vita.parallel.state import parallel_layout

    cfg = ModelConfig.from_hf_dir(hf_dir)
    ckpt = HFSource(hf_dir)
    qwen2, vit = qwen2_reference(cfg), _internvl_vision(cfg)
    source = checkpoint_weights_with(hf_dir, qwen2.state_dict(), _internvl_to_long_vita_names(vit.state_dict()))
    hf_long_vita = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report = {}
    for tp in (1, 2):
        par = ParallelConfig(tensor_model_parallel_size=tp)
        with parallel_layout(par):
            # 1) language part vs Qwen2ForCausalLM; 2) vision tower vs InternVLVisionModel
            model = build_model_chunks(cfg, par)[0]
            load_hf_weights([model], source, cfg, par)
            gen = torch.Generator().manual_seed(3)
            ids = torch.randint(0, cfg.tokens.bos_token_id, (2, 24), generator=gen)
            ours = forward_only([model], [{"tokens": ids}])[0]
            with torch.no_grad():
                ref = qwen2(input_ids=ids).logits
            report[f"tp{tp}_qwen2"] = (ours - ref).abs().max().item()
            for size in (cfg.vision.image_size, cfg.vision.image_size + 2 * cfg.vision.patch_size):
                px = torch.randn(3, 3, size, size, generator=gen)
                with torch.no_grad():
                    ours_v = model.vision_model(px)
                    ref_v = vit(pixel_values=px).last_hidden_state
                report[f"tp{tp}_vit{size}"] = (ours_v - ref_v).abs().max().item()
            # 3) whole model vs our HF class, both holding the checkpoint's weights
            load_hf_weights([model], ckpt, cfg, par)
            for kinds in (("image3", "text"), ("video2", "image1")):
                batch = collate(multimodal_batch(cfg, kinds, seq_len=40, seed=len(kinds[0])))
                ours = forward_only([model], [batch])[0]
                with torch.no_grad():
                    ref = hf_long_vita(input_ids=batch["tokens"], images=batch["pixel_values"]).logits
                report[f"tp{tp}_long_vita_{'+'.join(kinds)}"] = (ours - ref).abs().max().item()
    return report


def packed_documents(cfg, seed: int = 5, seq_length: int = SEQ_LENGTH, align: int = 1):
    """(documents' token lists, the packed training batch) for DOC_LENGTHS."""
    from megatron_vita.data.packing import collate_packs

    gen = torch.Generator().manual_seed(seed)
    docs = [text_ids(cfg, n, gen) for n in DOC_LENGTHS]
    no_tiles = np.zeros((0, cfg.vision.image_size, cfg.vision.image_size, 3), dtype=np.uint8)
    rows = [[(ids, ids[1:] + [-100], no_tiles) for ids in docs]]
    batch = collate_packs(rows, seq_length, pad_id=0, reset=True, num_image_token=cfg.num_image_token,
                          context_ids=cfg.tokens.context_ids, image_size=cfg.vision.image_size,
                          with_cu_seqlens=True, align=align)
    return docs, batch


def _packed(hf_dir):
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
    _, aligned = packed_documents(cfg, seq_length=48, align=4)  # as the loader packs for CP 2
    starts = {"plain": batch["cu_seqlens"].tolist()[:-1], "aligned": aligned["cu_seqlens_padded"].tolist()[:-1]}
    layouts = {"tp1": {}, "tp2": dict(tensor_model_parallel_size=2),
               "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
               "cp2_ring": dict(context_parallel_size=2),
               "cp2_ulysses": dict(context_parallel_size=2, context_parallel_algo="ulysses")}
    for name, layout in layouts.items():
        par = ParallelConfig(**layout)
        with parallel_layout(par):
            model = build_model_chunks(cfg, par)[0]
            load_hf_weights([model], weights, cfg, par)
            packed = forward_only([model], [batch])[0][0]
            control = forward_only([model], [unpacked])[0][0]
            loader_packed = forward_only([model], [aligned])[0][0] if par.cp > 1 else None
        diffs, control_diffs, aligned_diffs = [], [], []
        for ids, ref, start, at in zip(docs, refs, starts["plain"], starts["aligned"]):
            diffs.append((packed[start:start + len(ids)] - ref).abs().max().item())
            control_diffs.append((control[start:start + len(ids)] - ref).abs().max().item())
            if loader_packed is not None:
                aligned_diffs.append((loader_packed[at:at + len(ids)] - ref).abs().max().item())
        report[name] = dict(doc_diffs=diffs + aligned_diffs, control_diffs=control_diffs)
    return report


def _rank(rank, world, hf_dir):
    return {"modules": _modules(hf_dir), "packed": _packed(hf_dir)}


@pytest.fixture(scope="module")
def reports(tiny_hf_dir):
    return spawn(_rank, 2, tiny_hf_dir, timeout=560)


@pytest.mark.timeout(600)
def test_megatron_matches_transformers_modules(reports):
    for rank, report in enumerate(r["modules"] for r in reports):
        assert len(report) == 10, report
        for key, diff in report.items():
            bound = QWEN2_TOLERANCE if "qwen2" in key else 1e-5
            assert diff <= bound, f"rank {rank} {key}: max |diff| {diff:.3e} > {bound:g} ({report})"


@pytest.mark.timeout(600)
def test_packed_documents_match_qwen2_on_each_document_alone(reports):
    for rank, report in enumerate(r["packed"] for r in reports):
        # As training packs: one segment per document, then the padding's.
        assert report.pop("cu_seqlens") == [0, 9, 10, 23, 28, 32], report
        assert set(report) == {"tp1", "tp2", "tp2_sp", "cp2_ring", "cp2_ulysses"}
        for layout, r in report.items():
            where = f"rank {rank} {layout}: per-document max |diff| {r['doc_diffs']}"
            assert len(r["doc_diffs"]) == len(DOC_LENGTHS) * (2 if layout.startswith("cp") else 1)
            assert max(r["doc_diffs"]) <= QWEN2_TOLERANCE, where
            # The first document sees nothing before it either way; every later one would.
            assert r["control_diffs"][0] <= QWEN2_TOLERANCE, (where, r["control_diffs"])
            assert min(r["control_diffs"][1:]) > CONTROL_MARGIN, (where, r["control_diffs"])
