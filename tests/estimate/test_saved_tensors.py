"""The estimator's counts against a model the builder really builds, on real gloo ranks.

For several layouts (TP2 + SP in bf16, DP2 in fp32 with a trained ViT, selective and full
recompute, CP2 ring and Ulysses) two processes build Long-VITA with build_model_chunks and run a
forward with labels. torch's saved_tensors_hooks record every tensor autograd keeps for backward,
once per storage, parameters excluded, attributed to the module whose forward saved it. Those
bytes must equal megatron_vita.estimate.activations' counts for each LLM layer, ViT layer, the
projector, the head and the decoder under full recompute; the parameters of every part must equal
megatron_vita.estimate.params' counts (also at PP2, per stage).
"""
from __future__ import annotations

import collections

import pytest

from megatron_vita.config.model import LanguageConfig, ModelConfig, ProjectorConfig, TokenIds, VisionConfig
from megatron_vita.config.parallel import ParallelConfig

SEQ, TILES, K = 512, 6, 40


def small_model() -> ModelConfig:
    """Every width distinct, so a term counted with the wrong width cannot pass."""
    vocab = 256
    return ModelConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=80,
                            image_size=56, patch_size=14),
        projector=ProjectorConfig(ffn_hidden_size=48),
        language=LanguageConfig(vocab_size=vocab, hidden_size=64, num_layers=3, num_attention_heads=4,
                                num_query_groups=2, ffn_hidden_size=96, max_position_embeddings=4096),
        tokens=TokenIds.at_end_of_vocab(vocab), name="small",
    ).validate()


# name -> (ParallelConfig kwargs, bf16, recompute granularity, train ViT)
LAYOUTS = {
    "dp2-fp32-vit": (dict(), False, None, True),
    "tp2-sp-bf16": (dict(tensor_model_parallel_size=2, sequence_parallel=True), True, None, False),
    "tp2-fp32-selective": (dict(tensor_model_parallel_size=2), False, "selective", True),
    "dp2-fp32-full": (dict(), False, "full", True),
    "cp2-ring-fp32": (dict(context_parallel_size=2), False, None, False),
    "cp2-ulysses-bf16": (dict(context_parallel_size=2, context_parallel_algo="ulysses"), True, None, False),
    "pp2-params": (dict(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1), False, None, True),
}


def _batch(model):
    import torch

    from megatron_vita.data.template import video_token_ids

    gen = torch.Generator().manual_seed(0)
    tok = model.tokens
    ids = torch.randint(0, min(tok.special.values()) - 4, (SEQ,), generator=gen)
    media = video_token_ids(TILES, tok, model.num_image_token)
    ids[5:5 + len(media)] = torch.tensor(media)
    labels = torch.full((SEQ,), -100, dtype=torch.long)
    labels[SEQ - K - 1:-1] = ids[SEQ - K:]
    size = model.vision.image_size
    return {"tokens": ids[None], "labels": labels[None], "loss_mask": (labels != -100).float()[None],
            "pixel_values": torch.randn(TILES, 3, size, size, generator=gen)}


def _saved_by_module(chunk, batch):
    """{module name: bytes of the storages autograd keeps at the end of the forward, each counted
    once where it was first saved} (parameters excluded)."""
    import weakref

    import torch

    from megatron_vita.parallel.pipeline import model_inputs

    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    stack, seen = ["top"], {}
    watched = ("language_model.decoder.layers.", "vision_model.decoder.layers.", "vision_projection",
               "language_model.decoder.final_layernorm", "language_model.embedding", "language_model.decoder",
               "vision_model.decoder")
    for name, mod in chunk.named_modules():
        if name == "language_model" or name.startswith(watched) and \
                (name.count(".") <= 3 or name.endswith("final_layernorm")) and not name.startswith("vision_projection."):
            mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n))
            mod.register_forward_hook(lambda m, a, o: stack.pop() and None)

    def pack(t):
        key = t.untyped_storage().data_ptr()
        old = seen.get(key)
        # A storage whose saving tensor died (a graph branch freed during the forward) may be
        # reused at the same address: only a live entry means "already counted".
        if key not in params and (old is None or old[2]() is None):
            seen[key] = (stack[-1], t.untyped_storage().nbytes(), weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunk(**model_inputs(batch), labels=batch["labels"], loss_mask=batch["loss_mask"])
    counts = collections.Counter()
    for where, nbytes, ref in seen.values():
        if ref() is not None:
            counts[where] += nbytes
    del out
    return dict(counts)


def _groups(chunk):
    def numel(module):
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    lm = chunk.language_model
    out = {"language layers": numel(lm.decoder.layers)}
    if chunk.pre_process:
        out.update({"embedding": numel(lm.embedding), "vision": numel(chunk.vision_model),
                    "projector": numel(chunk.vision_projection)})
    if chunk.post_process:
        out["final norm + output layer"] = numel(lm.decoder.final_layernorm) + numel(lm.output_layer)
    return out


def _rank(rank, world):
    import torch

    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.pipeline import shard_microbatches
    from megatron_vita.parallel.state import destroy_parallel, initialize_parallel, rank_info

    model = small_model()
    results = {}
    for name, (kw, bf16, gran, train_vit) in LAYOUTS.items():
        par = ParallelConfig(**kw)
        initialize_parallel(par)
        try:
            chunk = build_model_chunks(model, par, BuildOptions(
                params_dtype=torch.bfloat16 if bf16 else torch.float32, recompute_granularity=gran,
                recompute_method="uniform" if gran == "full" else None,
                recompute_num_layers=1 if gran == "full" else None))[0]
            chunk.freeze(vision=not train_vit)
            chunk.train()
            results[name] = {"pp_rank": rank_info().pp_rank, "params": _groups(chunk)}
            if par.pp == 1:
                batch = shard_microbatches([chunk], [_batch(model)])[0]
                results[name]["tiles"] = int(batch["pixel_values"].shape[0])
                results[name]["k_local"] = int(batch["loss_mask"].sum())
                results[name]["saved"] = _saved_by_module(chunk, batch)
        finally:
            destroy_parallel()
    return results


@pytest.fixture(scope="module")
def measured():
    from mv_testlib import spawn

    return spawn(_rank, 2, timeout=240)


def _expected(name):
    from megatron_vita.estimate import activations as act
    from megatron_vita.estimate.params import vocab_rows

    kw, bf16, gran, train_vit = LAYOUTS[name]
    par, model = ParallelConfig(**kw), small_model()
    t = act.Tokens(seq=SEQ // par.cp, batch=1, tp=par.tp, sequence_parallel=par.sequence_parallel,
                   a=2 if bf16 else 4, cp=par.cp, ulysses=par.cp if par.context_parallel_algo == "ulysses" else 1)
    return par, model, t, vocab_rows(model, par)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [n for n in LAYOUTS if "pp" not in n])
def test_saved_tensors_equal_the_counts(measured, name):
    from megatron_vita.estimate import activations as act

    par, model, t, vr = _expected(name)
    _, bf16, gran, train_vit = LAYOUTS[name]
    n_llm, n_vit = model.language.num_layers, model.vision.num_layers
    for rank, res in enumerate(measured):
        got, tiles, where = res[name]["saved"], res[name]["tiles"], (name, rank)
        llm = [got.get(f"language_model.decoder.layers.{i}", 0) for i in range(n_llm)]
        vit = [got.get(f"vision_model.decoder.layers.{i}", 0) for i in range(n_vit)]
        if gran == "full":
            # Only each layer's input, kept by the checkpoint, and megatron's RoPE table (cached by
            # its RotaryEmbedding across micro-batches, passed to every checkpoint).
            assert llm == [0] * n_llm and vit == [0] * n_vit, where
            rope_table = 4 * t.seq * model.language.kv_channels
            assert got["language_model.decoder"] == n_llm * act.layer_input(model, t) + rope_table, where
            assert got["vision_model.decoder"] == n_vit * act.vit_layer_input(model, tiles, t.a), where
        else:
            want = act.llm_layer_saved(model, t, selective=gran == "selective")
            if t.ulysses > 1:
                # The first layer also meets the Ulysses permutation and its inverse (int64 over the
                # Ulysses sequence), cached and shared by every later layer.
                assert llm[0] == want + 2 * 8 * t.seq * t.ulysses, where
                llm = llm[1:]
            assert llm == [want] * len(llm), where
            want_vit = act.vit_layer_saved(model, tiles, par.tp, t.a, selective=gran == "selective")
            assert vit == [want_vit if train_vit else 0] * n_vit, where
        assert got.get("vision_projection", 0) == act.projector_saved(model, tiles, par.tp, t.a), where
        assert got["language_model.embedding.word_embeddings"] == act.embedding_saved(t, 0, False), where
        # The head keeps the supervised rows of this CP rank (all of them without CP).
        head = got["language_model.decoder.final_layernorm"] + got.get("language_model", 0)
        assert head == act.head_saved(model, t, vr, res[name]["k_local"], True), where


@pytest.mark.timeout(300)
def test_parameter_counts_equal_the_built_model(measured):
    from megatron_vita.estimate.params import stage_params

    model = small_model()
    for name, (kw, _, _, train_vit) in LAYOUTS.items():
        par = ParallelConfig(**kw)
        for res in measured:
            got = res[name]["params"]
            want = {g.name: g.numel for g in stage_params(model, par, res[name]["pp_rank"], train_vit)}
            assert got == want, (name, res[name]["pp_rank"])
