"""`megatron-vita serve` as a command: every bad flag is one line before any model loads, a taken
port fails at once, and the command really serves (examples/cpu/serve.sh on the tiny model, a
subprocess answered by the openai client, stopped with SIGINT)."""
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from megatron_vita.cli import main
from megatron_vita.inference.api import SamplingParams, single_turn

REPO = Path(__file__).resolve().parents[2]


def _errors(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("megatron-vita serve: error: ")]


def test_every_bad_flag_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    rc = main(["--backend", "cpu", "serve", "--model_path", tiny_model_dir, "--tp", "2", "--use-fused-rmsnorm",
               "--media-root", str(tmp_path / "missing"), "--max-tokens", "0", "--max-concurrency", "0",
               "--max-images", "-1", "--port", "70000"])
    lines = _errors(capsys)
    assert rc == 1
    for flag in ("--media-root", "--max-tokens", "--max-concurrency", "--max-images", "--tp", "--use-fused-rmsnorm",
                 "--port"):
        assert sum(flag in line for line in lines) == 1, (flag, lines)
    assert len(lines) == 7
    rc = main(["--backend", "cpu", "serve", "--model_path", str(tmp_path)])
    assert rc == 1 and _errors(capsys) == [
        f"megatron-vita serve: error: --model_path {tmp_path}: neither a Hugging Face directory (config.json) nor a "
        "Megatron checkpoint (latest_checkpointed_iteration.txt or iter_* directories)"]


def test_a_taken_port_fails_in_one_line_before_loading(tiny_model_dir, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        start = time.monotonic()
        rc = main(["--backend", "cpu", "serve", "--model_path", tiny_model_dir, "--port", str(taken.getsockname()[1])])
        lines = _errors(capsys)
        assert rc == 1 and len(lines) == 1 and "cannot listen there" in lines[0], lines
        assert time.monotonic() - start < 5  # no model was loaded
    finally:
        taken.close()


@pytest.mark.timeout(120)
def test_the_cpu_example_serves_until_interrupted(tiny_model_dir, generator, tmp_path):
    """examples/cpu/serve.sh (as a user runs it, on the tiny model instead of the demo's) starts
    the command, which answers the openai client like the in-process HFGenerator."""
    (tmp_path / "data").mkdir()  # the script's --media-root: $DEMO/data
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEMO": str(tmp_path), "MODEL": tiny_model_dir, "PORT": "0"}
    proc = subprocess.Popen(["bash", str(REPO / "examples/cpu/serve.sh"), "--served-model-name", "tiny",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 100
        seen = []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
            url = found and found.group(1)
        assert url, "".join(seen)
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="tiny", max_tokens=4,
                                                messages=[{"role": "user", "content": "Describe the video."}])
        ref = generator.generate(single_turn("Describe the video.", sampling=SamplingParams(max_new_tokens=4)))
        assert answer.choices[0].message.content == ref.text
        proc.send_signal(signal.SIGINT)  # uvicorn stops, then re-raises it: "megatron-vita: interrupted"
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
