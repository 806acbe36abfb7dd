"""The engine's pieces that need no ranks: sampling against transformers' own logits processors,
the KV store, the CP owner of a token, the request numbers' round trip, configuration refusals."""
import pytest
import torch


def _hf_processed(logits, history, s):
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    x = logits[None].clone()
    ids = torch.tensor([history])
    if s.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, x)
    if s.greedy:
        return x[0]
    x = TemperatureLogitsWarper(s.temperature)(ids, x)
    if s.top_k:
        x = TopKLogitsWarper(s.top_k)(ids, x)
    if s.top_p < 1.0:
        x = TopPLogitsWarper(s.top_p)(ids, x)
    return x[0]


@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.3), dict(temperature=0.7),
                                dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
                                dict(temperature=1.5, top_p=0.3), dict(temperature=0.9, top_k=3)])
def test_processed_logits_equal_transformers(kw):
    from megatron_vita.inference.engine.sampling import Sampling, processed_logits

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, generator=gen) * 3
    history = torch.randint(0, 300, (40,), generator=gen).tolist()
    s = Sampling(**kw)
    ours, ref = processed_logits(logits, history, s), _hf_processed(logits, history, s)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_choose_greedy_and_seeded_draws():
    from megatron_vita.inference.engine.sampling import Sampling, choose

    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert choose(logits, [], Sampling()) == 1
    assert choose(logits, [1], Sampling(repetition_penalty=2.0)) == 3  # 2.0 / 2 < 1.9
    s = Sampling(temperature=1.0, seed=7)
    draws = [[choose(logits, [], s, torch.Generator().manual_seed(7)) for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]
    assert choose(logits, [], Sampling(temperature=1.0, top_k=1), torch.Generator()) == 1


def test_sampling_pack_round_trip_and_budget():
    from megatron_vita.inference.engine.sampling import Sampling

    for s in (Sampling(), Sampling(17, 0.7, 0.8, 20, 1.05, 1234, 300)):
        assert Sampling.unpack(s.pack()) == s
    assert Sampling(max_new_tokens=10, max_seq_len=25).budget(20) == 5
    assert Sampling(max_new_tokens=10).budget(10 ** 6) == 10


def test_layer_kv_grows_and_keeps_what_is_cached():
    from megatron_vita.inference.engine.kv_cache import LayerKV

    kv = LayerKV()
    like = torch.zeros(1, 1, 2, 4)
    kv.reserve(like, 3)
    rows = [torch.full((2, 1, 2, 4), float(i)) for i in range(5)]
    for i, r in enumerate(rows):
        kv.append(r, -r, torch.tensor([2 * i, 2 * i + 1]))
    k, v, pos = kv.view()
    assert torch.equal(k, torch.cat(rows)) and torch.equal(v, -torch.cat(rows))
    assert pos.tolist() == list(range(10))
    kv.reset()
    assert kv.view()[0].shape[0] == 0


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_owner_of_matches_the_layout(cp):
    from megatron_vita.inference.engine.runner import _owner_of
    from megatron_vita.parallel.context.layout import SeqLayout

    for length in (1, 5, 2 * cp, 23):
        padded = -(-length // (2 * cp)) * 2 * cp
        layout = SeqLayout.single(padded, cp)
        for index in range(length):
            holders = [r for r in range(cp) if index in layout.indices(r).tolist()]
            assert holders == [_owner_of(index, length, cp)]


def test_generator_refuses_bad_configuration_before_any_rank(tmp_path, tiny_model_dir):
    from megatron_vita.config.parallel import ConfigError, ParallelConfig
    from megatron_vita.inference.engine import MegatronGenerator

    with pytest.raises(ConfigError) as err:
        MegatronGenerator(str(tmp_path / "missing"), ParallelConfig())
    assert "no such directory" in str(err.value)
    with pytest.raises(ConfigError) as err:
        MegatronGenerator(tiny_model_dir, ParallelConfig(tensor_model_parallel_size=3), tokenizer=str(tmp_path / "t"))
    lines = str(err.value).splitlines()
    assert any("--tensor-model-parallel-size 3" in l for l in lines) and any("--tokenizer" in l for l in lines)
    with pytest.raises(ConfigError, match="--prefill-chunk"):
        MegatronGenerator(tiny_model_dir, ParallelConfig(), prefill_chunk=0)
