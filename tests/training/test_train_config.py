"""Training options: one table for flags and recipes, with precedence and clear errors."""
import argparse
import textwrap

import pytest

from megatron_vita.training import config as tc
from megatron_vita.training.cli import build_config


def _parse(*argv):
    p = argparse.ArgumentParser()
    tc.add_arguments(p)
    return p.parse_args(list(argv))


def _recipe(tmp_path, training: str, stage: int = 1, tokenizer: str = "tokenizer") -> str:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: t
        stage: {stage}
        seq_length: 256
        model: tiny
        tokenizer: {tokenizer}
        datasets:
          - {{group: g, path: a.jsonl, ratio: 1.0}}
        training:
        """) + textwrap.indent(textwrap.dedent(training), "  "))
    (tmp_path / "a.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "yo"}]}\n')
    return str(path)


def test_precedence_flag_over_recipe_over_stage(tmp_path, demo_data):
    # A configuration that passes the launch checks: the demo's tokenizer matches the tiny model.
    recipe = _recipe(tmp_path, "lr: 3.0e-4\nglobal-batch-size: 16\ntensor_model_parallel_size: 2\n",
                     tokenizer=f"{demo_data}/tokenizer")
    cfg = build_config(_parse("--recipe", recipe, "--data-root", str(tmp_path), "--global-batch-size", "4"))
    assert cfg.global_batch_size == 4           # flag beats recipe
    assert cfg.optim.lr == 3e-4                  # recipe beats the stage default (stage 1: 1e-3)
    assert cfg.optim.min_lr == 1e-5              # stage default fills the gap
    assert cfg.parallel.tensor_model_parallel_size == 2  # underscores accepted too
    assert cfg.freeze_vision and cfg.freeze_language and not cfg.freeze_projector  # stage 1


def test_unknown_recipe_key_names_file_and_line(tmp_path):
    recipe = _recipe(tmp_path, "lr: 1.0e-4\nlearning-rate: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"r\.yaml:10: unknown training option 'learning_rate'"):
        build_config(_parse("--recipe", recipe, "--data-root", str(tmp_path)))


def test_wrong_type_is_named(tmp_path):
    recipe = _recipe(tmp_path, "train-iters: many\n")
    with pytest.raises(ValueError, match="train_iters' expects int, got 'many'"):
        build_config(_parse("--recipe", recipe, "--data-root", str(tmp_path)))


def test_stage_required_for_default_lr(tmp_path):
    recipe = _recipe(tmp_path, "train-iters: 2\n", stage=0)
    with pytest.raises(ValueError, match="no learning rate"):
        build_config(_parse("--recipe", recipe, "--data-root", str(tmp_path)))
    with pytest.raises(ValueError, match="--stage 7"):
        build_config(_parse("--recipe", recipe, "--data-root", str(tmp_path), "--stage", "7"))


def test_megatron_flags_and_stage_table():
    args = _parse("--recipe", "x", "--tensor-model-parallel-size", "8", "--sequence-parallel",
                  "--use-distributed-optimizer", "--recompute-granularity", "full", "--recompute-method", "uniform",
                  "--recompute-num-layers", "1", "--lr-warmup-fraction", "0.03", "--bf16")
    assert args.tensor_model_parallel_size == 8 and args.sequence_parallel and args.bf16
    assert tc.STAGES[2].vision_lr_mult == 0.1 and tc.STAGES[2].vision_layer_decay == 0.9
    assert tc.stage_defaults(3)["freeze_vision"] and not tc.stage_defaults(3)["freeze_language"]


def test_released_stage_recipes_carry_the_released_layouts():
    from megatron_vita.data.recipe import load_recipe

    expect = {1: (8, 1, 512, 1e-3), 2: (8, 1, 540, 1e-5), 3: (8, 2, 64, 5e-6), 4: (8, 8, 8, 5e-6)}
    for stage, (tp, cp, gbs, lr) in expect.items():
        r = load_recipe(f"data_recipes/stage{stage}.yaml")
        cfg = tc.merge(argparse.Namespace(), r.training, r.path, tc.stage_defaults(stage))
        assert (cfg.parallel.tp, cfg.parallel.cp, cfg.global_batch_size, cfg.optim.lr) == \
            (tp, cp, gbs, lr), stage


def test_each_flag_has_one_home_and_round_trips(tmp_path):
    from megatron_vita.config import ParallelConfig, resolve_model_config
    from megatron_vita.data.recipe import load_recipe
    from megatron_vita.training.preflight import training_layout

    # Recipe keys and flags fill the one ParallelConfig / OptimConfig of the run.
    r = load_recipe(_recipe(tmp_path, "decoder-first-pipeline-num-layers: 1\nmake_vocab_size_divisible_by: 64\n"
                                      "adam-beta2: 0.95\nlr-decay-style: linear\n"))
    args = _parse("--recipe", r.path, "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer")
    cfg = tc.merge(args, r.training, r.path, tc.stage_defaults(1))
    assert cfg.parallel == ParallelConfig(pipeline_model_parallel_size=2, use_distributed_optimizer=True,
                                          num_layers_in_first_pipeline_stage=1, make_vocab_size_divisible_by=64)
    assert (cfg.optim.adam_beta2, cfg.optim.lr_decay_style, cfg.optim.lr) == (0.95, "linear", 1e-3)
    # Every option is read back under its flag name, and checkpoints store exactly the parser's names.
    assert set(vars(tc.to_namespace(cfg))) == set(vars(args)) == set(tc.FLAGS)
    assert tc.TrainConfig.from_flags(**{name: cfg.flag(name) for name in tc.FLAGS}) == cfg
    with pytest.raises(TypeError, match="unknown training option 'learning_rate'"):
        tc.TrainConfig.from_flags(learning_rate=1.0)
    # The virtual pipeline is resolved against the model into the run's layout, not into cfg.parallel.
    cfg = tc.TrainConfig.from_flags(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)
    par, problems = training_layout(cfg, resolve_model_config("tiny"), world_size=2)
    assert problems == [] and par.vpp == 2 and cfg.parallel.vpp is None  # tiny: 4 layers, 2 per pipeline stage
