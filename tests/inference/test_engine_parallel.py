"""The generation engine on real gloo ranks: KV-cache decoding against re-prefill, chunked prefill
against one-shot, greedy answers against transformers' generate on the same weights, and
MegatronGenerator under torchrun-style ranks (rank 0 drives, the others answer in lock-step).

One 4-rank spawn runs every layout in turn (TP2 x PP2, TP2 x CP2 ring, PP2 x VPP2 x CP2
Ulysses): a greedy answer with the logits each token was chosen from, the same answer with
chunked prefill (chunks that cut through image tiles), and the logits of re-running the whole
sequence for every step through the independent training-style forward
(`parallel.pipeline.forward_only`, no cache). The HF reference is transformers' own `generate`
(KV cache, greedy) on the HF checkpoint the ranks load. Then the same ranks (WORLD_SIZE set, as
under torchrun) build a MegatronGenerator at TP2 x CP2 with chunked prefill and answer requests
with real media; the answers must equal the HF path's (`inference.hf_generator`).
"""
import pytest
import torch

from mv_testlib import multimodal_batch, spawn

NEW = 4
LAYOUTS = [dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
           dict(tensor_model_parallel_size=2, context_parallel_size=2),
           dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, context_parallel_size=2,
                context_parallel_algo="ulysses")]
CHUNK = 11  # 39-token prompt: chunks 11, 11, 11, 6 (padded to the CP multiple each)


def _prompt(cfg):
    b = multimodal_batch(cfg, kinds=("image3",), seq_len=39, seed=4)[0]
    return b["tokens"][0], b["pixel_values"]


def _requests(png, mp4):
    from megatron_vita.inference.api import SamplingParams, single_turn

    greedy = SamplingParams(max_new_tokens=6)
    return [single_turn("What is in the picture?", images=[png], sampling=greedy),
            single_turn("Describe the video.", videos=[mp4], sampling=greedy, max_num_frame=2)]


def _layouts(path):
    from megatron_vita.config.model import ModelConfig
    from megatron_vita.config.parallel import ParallelConfig
    from megatron_vita.inference.engine.runner import RankEngine
    from megatron_vita.inference.engine.sampling import Sampling
    from megatron_vita.parallel.pipeline import forward_only

    cfg = ModelConfig.from_hf_dir(path)
    ids, pixels = _prompt(cfg)
    out = []
    for layout in LAYOUTS:
        engine = RankEngine(cfg, ParallelConfig(**layout), ("hf", path))
        runs = {}
        for chunk in (None, CHUNK):
            engine.prefill_chunk = chunk
            recorded = []
            tokens = engine.generate(ids, pixels, Sampling(max_new_tokens=NEW), stop_ids=[], recorded=recorded)
            runs[chunk] = (tokens, recorded)
        tokens = runs[None][0]
        reference = []
        for i in range(NEW):  # the whole sequence again for every step (what the original server did)
            seq = torch.cat([ids, torch.tensor(tokens[:i], dtype=torch.long)])
            logits = forward_only(engine.chunks, [{"tokens": seq[None], "pixel_values": pixels}])
            if logits is not None:
                reference.append(logits[0][0, -1, :cfg.language.vocab_size].float())
        keep = engine.info.tp_rank == 0 and engine.info.cp_rank == 0 and bool(reference)
        out.append(dict(runs=runs, reference=reference if keep else None))
        engine.close()
    return out


def _generator(rank, path, png, mp4):
    """MegatronGenerator as `infer` runs it under torchrun: every rank calls generate / stream."""
    from megatron_vita.config.parallel import ParallelConfig
    from megatron_vita.inference.api import single_turn
    from megatron_vita.inference.engine import MegatronGenerator

    gen = MegatronGenerator(path, ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2),
                            prefill_chunk=16)
    results, refused = [gen.generate(r) for r in _requests(png, mp4)], None
    streamed = "".join(gen.stream(_requests(png, mp4)[0]))
    if gen.is_driver:  # only rank 0 sees a bad request: it is refused before anything is broadcast
        try:
            gen.generate(single_turn("?", images=[png + ".missing"]))
        except ValueError as e:
            refused = str(e)
    again = gen.generate(_requests(png, mp4)[1])
    gen.close()
    return dict(results=results, streamed=streamed, refused=refused, again=again, driver=gen.is_driver)


def _rank(rank, world, path, png, mp4):
    return dict(layouts=_layouts(path), generator=_generator(rank, path, png, mp4))


def _by_step(per_rank, layout_index, chunk):
    steps = {}
    for result in per_rank:
        for i, logits in result["layouts"][layout_index]["runs"][chunk][1]:
            assert i not in steps, f"step {i} chosen on two ranks"
            steps[i] = logits
    return [steps[i] for i in range(NEW)]


@pytest.mark.timeout(400)
def test_engine_layouts_and_torchrun_generator_answer_like_hf(tiny_model_dir, png_path, mp4_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from megatron_vita.config.model import ModelConfig
    from megatron_vita.inference.hf_generator import HFGenerator

    per_rank = spawn(_rank, 4, tiny_model_dir, png_path, mp4_path, timeout=380)
    cfg = ModelConfig.from_hf_dir(tiny_model_dir)
    ids, pixels = _prompt(cfg)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(ids[None], images=pixels, attention_mask=torch.ones_like(ids[None]),
                          generation_config=GenerationConfig(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                                                             num_beams=1, pad_token_id=cfg.tokens.pad_token_id))
    hf_tokens = out[0, ids.shape[0]:].tolist()
    assert len(hf_tokens) == NEW
    for j, layout in enumerate(LAYOUTS):
        for chunk in (None, CHUNK):  # every rank decoded transformers' tokens
            tokens = {tuple(r["layouts"][j]["runs"][chunk][0]) for r in per_rank}
            assert tokens == {tuple(hf_tokens)}, (layout, chunk, tokens, hf_tokens)
        cached, cached_chunked = _by_step(per_rank, j, None), _by_step(per_rank, j, CHUNK)
        reference = next(r["layouts"][j]["reference"] for r in per_rank if r["layouts"][j]["reference"] is not None)
        for i in range(NEW):
            assert (cached[i] - reference[i]).abs().max() <= 1e-5, (layout, i)  # KV cache == re-prefill
            assert (cached_chunked[i] - cached[i]).abs().max() <= 1e-5, (layout, i)  # chunked == one-shot

    expected = [HFGenerator(tiny_model_dir).generate(r) for r in _requests(png_path, mp4_path)]
    for r in per_rank:
        g = r["generator"]
        assert [(x.token_ids, x.text, x.finish_reason, x.prompt_tokens) for x in g["results"]] == \
            [(x.token_ids, x.text, x.finish_reason, x.prompt_tokens) for x in expected]
        assert g["streamed"] == expected[0].text and g["again"].token_ids == expected[1].token_ids
    drivers = [r["generator"] for r in per_rank if r["generator"]["driver"]]
    assert len(drivers) == 1 and "no such file" in drivers[0]["refused"]
