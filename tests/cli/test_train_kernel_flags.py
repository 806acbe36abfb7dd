"""`megatron-vita train` takes MindSpeed's kernel flags: from the command line or a recipe's
`training:` section into TrainConfig.features (what every rank's platform.activate applies, and
what checkpoints record under the flag names); a backend that cannot run one is a preflight
problem, one line among the others, before any rank starts."""
import argparse
import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_vita.config.features import npu_feature_names
from megatron_vita.platform import ENV_VAR
from megatron_vita.training import config as tc

REPO = Path(__file__).resolve().parents[2]
EMULATION = str(REPO / "tests" / "emulation")
NAMES = npu_feature_names()
pytestmark = pytest.mark.skipif(len(NAMES) < 2, reason="needs two NPU features in mindspeed_patches.FEATURES")


def _parse(*argv):
    parser = argparse.ArgumentParser()
    tc.add_arguments(parser)
    return parser.parse_args(list(argv))


def _recipe(tmp_path, training: str) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: t
        stage: 1
        seq_length: 256
        model: tiny
        tokenizer: tokenizer
        datasets:
          - {group: g, path: a.jsonl, ratio: 1.0}
        training:
        """) + f"  {training}\n")
    (tmp_path / "a.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "yo"}]}\n')
    return recipe


def test_flags_and_recipe_fill_the_configs_features(tmp_path):
    first, second = NAMES[0], NAMES[1]
    recipe = _recipe(tmp_path, f"{second}: true")
    from megatron_vita.data.recipe import load_recipe

    r = load_recipe(str(recipe))
    cfg = tc.merge(_parse("--recipe", str(recipe), f"--{first}"), r.training, r.path, {})
    assert cfg.features == (first, second)
    # Read back under the flag names (checkpoints store them so), and reproduced as flags.
    ns = tc.to_namespace(cfg)
    assert getattr(ns, first.replace("-", "_")) is True and getattr(ns, second.replace("-", "_")) is True
    assert tc.flags_of(cfg, [first.replace("-", "_")]) == [f"--{first}"]
    # Not given anywhere: off, and the recipe's value is not overridden by the flag's parser default.
    assert tc.merge(_parse("--recipe", str(recipe)), r.training, r.path, {}).features == (second,)


def test_train_refuses_a_kernel_flag_the_backend_cannot_run(tmp_path, monkeypatch, capsys):
    """Without the torch_npu emulation a kernel flag on --backend cpu is one problem line among
    the others (here a bad --train-iters), and nothing is spawned."""
    from megatron_vita.cli import main

    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p) != EMULATION])
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    importlib.invalidate_caches()
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("a torch_npu is installed here")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != ENV_VAR})
    recipe = _recipe(tmp_path, "lr: 1.0e-4")
    code = main(["train", "--backend", "cpu", "--recipe", str(recipe), "--data-root", str(tmp_path),
                 "--train-iters", "0", f"--{NAMES[0]}"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in err if f"--{NAMES[0]}" in line]
    assert len(ours) == 1 and ours[0].startswith(f"megatron-vita train: error: --{NAMES[0]}: an NPU kernel"), err
    assert "megatron-vita train: error: --train-iters 0: expected an integer >= 1" in err
    assert all(line.startswith("megatron-vita train: error: ") for line in err), err
