"""MegatronGenerator with ranks it spawns itself (no torchrun): the ranks stay alive across
requests behind a pipe that carries only plain values; answers equal the HF path's (greedy),
streamed pieces join to the whole answer, a seed fixes sampled answers, a bad request is refused
in one line and the ranks keep serving, and close() stops them."""
import pytest

from megatron_vita.inference.api import SamplingParams, single_turn


@pytest.mark.timeout(240)
def test_spawned_generator_serves_requests_like_hf(tiny_model_dir, png_path):
    from megatron_vita.config.parallel import ParallelConfig
    from megatron_vita.inference.engine import MegatronGenerator
    from megatron_vita.inference.hf_generator import HFGenerator

    request = single_turn("What is in the picture?", images=[png_path], sampling=SamplingParams(max_new_tokens=6))
    want = HFGenerator(tiny_model_dir).generate(request)
    gen = MegatronGenerator(tiny_model_dir, ParallelConfig(), prefill_chunk=7)
    try:
        got = gen.generate(request)
        assert (got.token_ids, got.text, got.finish_reason, got.prompt_tokens) == \
            (want.token_ids, want.text, want.finish_reason, want.prompt_tokens)
        assert "".join(gen.stream(request)) == want.text
        with pytest.raises(ValueError, match="no such file"):
            gen.generate(single_turn("?", images=[png_path + ".missing"]))
        sampled = SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.9, seed=5)
        a, b = (gen.generate(single_turn("Hello", sampling=sampled)) for _ in range(2))
        assert a.token_ids == b.token_ids and len(a.token_ids) >= 1
        assert gen.generate(request).token_ids == want.token_ids  # still serving
    finally:
        gen.close()
    assert not gen._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate(request)
