"""`megatron-vita estimate`: refusals, the verdict line, how the terms scale, the released stages.

Fast: no process is spawned (the counts themselves are checked against real layers in
test_saved_tensors.py, the totals against measured peaks by benchmarks/estimate_accuracy.py).
"""
from __future__ import annotations

import os
import re

import pytest

from megatron_vita.config.parallel import ConfigError, ParallelConfig
from megatron_vita.estimate import EstimateInputs, estimate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERDICT = re.compile(r"^estimate: total=(\d+\.\d\d) GiB per device, (fits|does not fit) in (\S+) GiB$")
BRIEF = ["estimate", "--model", "long-vita-14b", "--seq-length", "1048576", "--tp", "8", "--cp", "8", "--pp", "1",
         "--recompute", "full", "--dp", "8", "--use-distributed-optimizer", "--frames", "4096", "--device-memory", "64"]


def _cli(capsys, argv):
    from megatron_vita.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.splitlines()


def _inputs(**kw) -> EstimateInputs:
    par = ParallelConfig(**{k: kw.pop(k) for k in list(kw) if k in ParallelConfig.__dataclass_fields__})
    return EstimateInputs(model=kw.pop("model", "long-vita-14b"), parallel=par, **kw)


def test_the_briefs_command_ends_with_the_verdict_line(capsys):
    code, out, err = _cli(capsys, BRIEF)
    assert code == 0, err
    m = VERDICT.match(out[-1])
    assert m, out[-1]
    # fp32, no SP, the ViT trained on 513 tiles per rank: far beyond 64 GiB, and said so.
    assert m.group(2) == "does not fit" and m.group(3) == "64" and float(m.group(1)) > 64
    assert any(line.startswith("not modelled: ") for line in out)
    assert any(line.startswith("modelled: ") for line in out)


def test_ulysses_at_tp8_cp8_is_refused_in_one_line_naming_the_flag(capsys):
    code, out, err = _cli(capsys, BRIEF + ["--cp-algo", "ulysses"])
    assert code == 1 and out == []
    assert err == ["megatron-vita estimate: error: --context-parallel-algo ulysses with --context-parallel-size 8: "
                   "each of the 8 tensor-parallel ranks holds 40/8 = 5 query heads, which do not split over 8 "
                   "Ulysses ranks; use ring"]


def test_every_problem_is_one_line_naming_its_flag(capsys):
    code, out, err = _cli(capsys, ["estimate", "--model", "long-vita-14b", "--seq-length", "1048570", "--tp", "3",
                                   "--cp", "8", "--recompute", "full", "--recompute-method", "blob", "--frames", "-3",
                                   "--cp-algo", "hybrid", "--ulysses-degree-in-cp", "3"])
    assert code == 1 and out == []
    flags = ["--frames -3", "--tensor-model-parallel-size 3", "--seq-length 1048570", "--recompute-method 'blob'",
             "--ulysses-degree-in-cp 3"]
    for flag in flags:
        assert sum(flag in line for line in err) >= 1, (flag, err)
    assert all(line.startswith("megatron-vita estimate: error: --") for line in err), err


def test_validate_raises_one_problem_per_line():
    with pytest.raises(ConfigError) as e:
        estimate(_inputs(seq_length=4096, tensor_model_parallel_size=8, context_parallel_size=8,
                         context_parallel_algo="ulysses", supervised_tokens=5000))
    assert len(e.value.problems) == 2
    assert e.value.problems[1].startswith("--supervised-tokens 5000")


@pytest.mark.parametrize("stage,cp,seq", [(3, 2, 131072), (4, 8, 1048576)])
def test_released_stage_layouts_produce_a_number(capsys, stage, cp, seq):
    recipe = os.path.join(ROOT, "data_recipes", f"stage{stage}.yaml")
    code, out, err = _cli(capsys, ["estimate", "--recipe", recipe, "--dp", "8"])
    assert code == 0, err
    assert f"CP{cp} (ring) SP DP8 dist-opt, bf16, seq {seq}" in out[1]
    assert "trains projector, LLM" in out[0] and "recompute full" in out[1]
    m = VERDICT.match(out[-1])
    assert m and 10 < float(m.group(1)) < 64 and m.group(2) == "fits", out[-1]


def test_optimizer_state_halves_when_dp_doubles_with_the_distributed_optimizer():
    def opt(dp, dist):
        e = estimate(_inputs(seq_length=8192, tensor_model_parallel_size=8, data_parallel_size=dp,
                             use_distributed_optimizer=dist))
        return e.stages[0].get("optimizer")

    assert opt(8, True) == pytest.approx(opt(4, True) / 2, rel=1e-6)
    assert opt(8, False) == opt(4, False)
    # bf16 parameters: fp32 master + m + v = 12 bytes per trained parameter; fp32: m + v = 8
    trained = estimate(_inputs(seq_length=64, tensor_model_parallel_size=8)).stages[0].get("gradients") // 4
    assert opt(1, False) == 12 * trained
    fp32 = estimate(_inputs(seq_length=64, tensor_model_parallel_size=8, bf16=False)).stages[0]
    assert fp32.get("optimizer") == 8 * trained and fp32.get("weights") == 4 * trained


def test_the_released_qwen25_14b_has_its_published_parameter_count():
    from megatron_vita.estimate.params import stage_params

    groups = {g.name: g.numel for g in stage_params(_inputs().model, ParallelConfig(), 0)}
    llm = groups["language layers"] + groups["embedding"] + groups["final norm + output layer"]
    assert llm == 14_770_033_664  # Qwen2.5-14B(-Instruct), untied head
    assert 300e6 < groups["vision"] < 310e6  # InternViT-300M-448px


def test_context_parallelism_shrinks_the_activations_of_a_device():
    act = {cp: estimate(_inputs(seq_length=131072, tensor_model_parallel_size=8, sequence_parallel=True,
                                context_parallel_size=cp)).stages[0].get("activations") for cp in (1, 2, 4)}
    assert act[2] < 0.56 * act[1] and act[4] < 0.56 * act[2]


def test_full_recompute_keeps_only_layer_inputs():
    kw = dict(seq_length=131072, tensor_model_parallel_size=8, sequence_parallel=True, context_parallel_size=2)
    full = estimate(_inputs(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1, **kw))
    none = estimate(_inputs(**kw))
    n_tokens = 131072 // 2 // 8  # per CP rank, split over TP by SP
    assert full.stages[0].get("activations") == 48 * n_tokens * 5120 * 2
    assert full.stages[0].get("activations") < none.stages[0].get("activations") / 15
    # uniform with 4 layers per unit keeps 12 inputs and rebuilds 4 layers at a time
    four = estimate(_inputs(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=4, **kw))
    assert four.stages[0].get("activations") == 12 * n_tokens * 5120 * 2
    assert four.stages[0].get("working") > full.stages[0].get("working")


def test_the_masked_head_holds_k_rows_instead_of_the_sequence():
    kw = dict(seq_length=32768, tensor_model_parallel_size=8, supervised_tokens=1024)
    masked = estimate(_inputs(**kw)).stages[0].get("head")
    full = estimate(_inputs(logits_mask=False, **kw)).stages[0].get("head")
    softmax_rows = 152064 // 8 * 4
    assert full - masked > (32768 - 1024) * softmax_rows


def test_the_first_pipeline_stage_holds_pp_micro_batches():
    kw = dict(seq_length=16384, tensor_model_parallel_size=8, pipeline_model_parallel_size=4, sequence_parallel=True)
    e = estimate(_inputs(**kw))
    first, last = e.stages[0], e.stages[-1]
    assert "3 more micro-batch" in next(t.detail for t in first.terms if t.name == "in flight")
    assert last.get("in flight") == 0
    capped = estimate(_inputs(global_batch_size=2, **kw)).stages[0]
    assert capped.get("in flight") == pytest.approx(first.get("in flight") / 3)
