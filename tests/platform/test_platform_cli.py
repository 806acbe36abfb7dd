"""The command line's start-up: `python -m megatron_vita` refuses an unusable backend with one clear
line (exit 2, no traceback); --help and flag errors import neither torch, transformers nor megatron;
`import megatron_vita` stays light and still registers the Long-VITA Auto classes, whenever and
however transformers is imported afterwards."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_vita.platform import ENV_VAR

REPO = Path(__file__).resolve().parents[2]
no_torch_npu = pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None,
                                  reason="torch_npu is installed here, so --backend npu may work")


# Each start of the CLI costs seconds of imports: all cases start together, then are checked one by one.
CASES = {
    "flag": (["--backend", "npu", "verify", "--hf", "x"], None),
    "flag_after_command": (["verify", "--backend", "npu", "--hf", "x"], None),
    "env": (["verify", "--hf", "x"], "npu"),
    "cuda": (["--backend", "cuda", "verify", "--hf", "x"], None),
}


@pytest.fixture(scope="module")
def cli_runs():
    procs = {}
    for name, (argv, env_backend) in CASES.items():
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        if env_backend is not None:
            env[ENV_VAR] = env_backend
        procs[name] = subprocess.Popen([sys.executable, "-m", "megatron_vita", *argv], cwd=REPO, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def assert_one_line_refusal(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("megatron-vita: error: backend '")
    for needle in needles:
        assert needle in lines[0]


@no_torch_npu
def test_backend_flag_npu_without_torch_npu(cli_runs):
    assert_one_line_refusal(cli_runs["flag"], "torch_npu", "(from --backend)")


@no_torch_npu
def test_backend_flag_after_the_command(cli_runs):
    assert_one_line_refusal(cli_runs["flag_after_command"], "torch_npu")


@no_torch_npu
def test_environment_npu_without_torch_npu(cli_runs):
    assert_one_line_refusal(cli_runs["env"], "torch_npu", f"(from {ENV_VAR})")


@no_torch_npu
@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch build")
def test_backend_flag_cuda_on_cpu_only_torch(cli_runs):
    assert_one_line_refusal(cli_runs["cuda"], "CPU-only build")


@no_torch_npu
@pytest.mark.parametrize("argv", [
    ["--backend", "cpu", "data", "inspect", "--recipe", "missing.yaml"],
    ["data", "--backend", "cpu", "inspect", "--recipe", "missing.yaml"],
    ["data", "inspect", "--backend", "cpu", "--recipe", "missing.yaml"],
    ["data", "inspect", "--recipe", "missing.yaml", "--backend", "cpu"],
])
def test_backend_flag_anywhere_in_a_nested_command(argv, monkeypatch, capsys):
    """README: every command takes --backend; after a subcommand (`data inspect`) too. Parsing then
    succeeds and the command itself runs (here: refusing the missing recipe in one line)."""
    from megatron_vita.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() records the backend for child processes
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == "megatron-vita data: error: recipe missing.yaml not found", err
    assert os.environ[ENV_VAR] == "cpu"


HEAVY = ("torch", "transformers", "megatron")

# Runs main() for each command line in one fresh interpreter, then reports its exit codes and the
# heavy packages it imported.
HELP_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from megatron_vita.cli import COMMANDS, main
    runs = [["--help"], ["data", "inspect", "--help"], ["train", "--no-such-flag"], ["convert", "--tp"]]
    runs += [[name, "--help"] for name in COMMANDS]
    codes = []
    for argv in runs:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
            try:
                codes.append(main(argv))
            except SystemExit as e:
                codes.append(e.code)
        assert argv[-1] != "--help" or "usage: megatron-vita" in out.getvalue(), argv
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
    print(json.dumps({"codes": codes, "heavy": heavy, "commands": len(COMMANDS)}))
""")


@pytest.mark.timeout(120)
def test_help_and_flag_errors_import_no_heavy_package():
    """`megatron-vita --help`, every `megatron-vita COMMAND --help` and a mistyped flag are answered
    by argparse alone: no torch, transformers or megatron-core (the backend and the commands' work
    are imported only once the flags parse)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *HEAVY], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 2, 2] + [0] * report["commands"], report
    assert report["heavy"] == [], report


# `import megatron_vita` first, then transformers reached three ways: directly; through one of its
# model modules (which imports the Auto classes half-way through its own import); through this
# project's HF modeling module (the same, from inside megatron_vita). Then a long_vita folder is
# loaded with the plain Auto classes.
REGISTRATION_PROBE = textwrap.dedent("""
    import json, sys
    import megatron_vita
    light = not {"torch", "transformers"} & {m.split(".")[0] for m in sys.modules}
    if sys.argv[2]:
        __import__(sys.argv[2])
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    # The Auto-class watcher removes itself once it registered (megatron_import's finder waits
    # for megatron-core, which this process never imports).
    watchers = [type(f).__name__ for f in sys.meta_path if type(f).__module__ == "megatron_vita.hf"]
    print(json.dumps({"light": light, "config": type(config).__name__, "model": type(model).__name__,
                      "watchers": watchers}))
""")


@pytest.mark.timeout(240)
def test_auto_classes_registered_when_transformers_comes_after_megatron_vita(tiny_hf_dir):
    first = {"transformers": "", "a transformers model module": "transformers.models.qwen2.modeling_qwen2",
             "megatron_vita.hf.modeling": "megatron_vita.hf.modeling"}
    procs = {name: subprocess.Popen([sys.executable, "-c", REGISTRATION_PROBE, tiny_hf_dir, module], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, module in first.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=200)
        assert proc.returncode == 0, f"{name}: {err}"
        report = json.loads(out.strip().splitlines()[-1])
        assert report == {"light": True, "config": "LongVITAConfig", "model": "LongVITAForCausalLM",
                          "watchers": []}, (name, report)


# A tokenizer is all the data pipeline needs: AutoTokenizer imports transformers' Auto modules,
# which registers LongVITAConfig, but the model classes (transformers' modeling code, seconds of
# imports per launcher, rank and dataloader worker) wait for the first LongVITAConfig.
TOKENIZER_PROBE = textwrap.dedent("""
    import json, sys
    import megatron_vita
    from megatron_vita.data.demo import train_tokenizer
    from megatron_vita.data.template import load_tokenizer
    train_tokenizer(["a cat on a mat", "two red squares"], sys.argv[1])
    tok = load_tokenizer(sys.argv[1])
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    modeling = sorted(m for m in ("transformers.modeling_utils", "megatron_vita.hf.modeling") if m in sys.modules)
    config_registered = "long_vita" in CONFIG_MAPPING
    from transformers import AutoConfig, AutoModelForCausalLM
    from megatron_vita.config.model import ModelConfig
    d = ModelConfig.from_name("tiny").to_hf_dict()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    print(json.dumps({"modeling": modeling, "config": config_registered, "model": type(model).__name__}))
""")


@pytest.mark.timeout(120)
def test_loading_a_tokenizer_imports_no_modeling_code(tmp_path):
    proc = subprocess.run([sys.executable, "-c", TOKENIZER_PROBE, str(tmp_path / "tok")], cwd=REPO,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"modeling": [], "config": True, "model": "LongVITAForCausalLM"}, report
