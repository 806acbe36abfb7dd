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
    assert cfg.lr == 3e-4                        # recipe beats the stage default (stage 1: 1e-3)
    assert cfg.min_lr == 1e-5                    # stage default fills the gap
    assert cfg.tensor_model_parallel_size == 2   # underscores accepted too
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
        assert (cfg.tensor_model_parallel_size, cfg.context_parallel_size, cfg.global_batch_size, cfg.lr) == \
            (tp, cp, gbs, lr), stage
