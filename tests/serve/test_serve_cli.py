"""`megatron-vita serve` as a command: every bad flag is one line before any model loads, a taken
port fails at once, and the command really serves (examples/cpu/serve.sh on the tiny model, a
subprocess answered by the openai client, stopped with SIGINT)."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_for_url(proc, timeout: float) -> str:
    """The server's URL from the command's stderr line `serve: NAME on http://HOST:PORT/v1`."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
        if found:  # keep reading, so that what the processes print later cannot fill the pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return found.group(1)
    raise AssertionError("no server URL on stderr:\n" + "".join(seen[-30:]))


@pytest.mark.timeout(120)
def test_the_cpu_example_serves_until_interrupted(tiny_model_dir, generator, tmp_path):
    """examples/cpu/serve.sh (as a user runs it, on the tiny model instead of the demo's) starts
    the command, which answers the openai client like the in-process HFGenerator."""
    (tmp_path / "data").mkdir()  # the script's --media-root: $DEMO/data
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEMO": str(tmp_path), "MODEL": tiny_model_dir, "PORT": "0"}
    proc = subprocess.Popen(["bash", str(REPO / "examples/cpu/serve.sh"), "--served-model-name", "tiny",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _wait_for_url(proc, 100)
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


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_rank0_serves_the_others_follow(tiny_model_dir, generator, tmp_path):
    """A Megatron checkpoint at TP 2 under torchrun: rank 0 answers HTTP (as the HF path does),
    rank 1 follows its requests. Ctrl-C reaches every process while a request is generating:
    the request still completes (rank 1 keeps following until rank 0's close; a follower that
    quit at once left rank 0's generation without its partner) and every process stops."""
    from megatron_vita.checkpoint.convert import convert
    from megatron_vita.config.parallel import ParallelConfig

    ckpt = str(tmp_path / "megatron")
    convert(tiny_model_dir, ckpt, layout=ParallelConfig(tensor_model_parallel_size=2), progress=False,
            log=lambda *a: None)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                             "-m", "megatron_vita", "--backend", "cpu", "serve", "--model_path", ckpt, "--tp", "2",
                             "--tokenizer", tiny_model_dir, "--port", "0", "--served-model-name", "tiny",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        url = _wait_for_url(proc, 200)
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)

        def ask(tokens):
            return client.chat.completions.create(model="tiny", max_tokens=tokens, messages=[
                {"role": "user", "content": "Describe the video."}]).choices[0].message.content

        def want(tokens):
            request = single_turn("Describe the video.", sampling=SamplingParams(max_new_tokens=tokens))
            return generator.generate(request).text

        assert ask(4) == want(4)
        in_flight = {}
        asker = threading.Thread(target=lambda: in_flight.update(answer=ask(32)), daemon=True)
        asker.start()
        health = url[: -len("/v1")] + "/health"
        deadline = time.monotonic() + 60
        while httpx.get(health).json()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: torchrun and both ranks get it
        asker.join(90)
        assert in_flight.get("answer") == want(32)
        proc.wait(60)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid):
            assert time.monotonic() < deadline, "a rank outlived torchrun"
            time.sleep(0.2)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("the ranks did not stop after Ctrl-C")
