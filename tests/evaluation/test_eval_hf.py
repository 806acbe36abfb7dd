"""`megatron-vita eval` end to end on the HF path: a Video-MME-format benchmark written here
(parquet as released, real MP4s) asked of a tiny Long-VITA that answers with letters.

The accuracy `eval` prints is recomputed here from the results file and the answer key; an
interrupted run (--limit, then a kill -9 of the command) resumes without asking an answered
question again, counted at HFGenerator.generate (the real method, wrapped to count calls)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from eval_layouts import read_jsonl, videomme_rows, write_videomme
from megatron_vita.cli import main
from megatron_vita.inference.hf_generator import HFGenerator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def calls(monkeypatch):
    """Each HFGenerator.generate call's question text, the real generate running underneath."""
    asked = []
    real = HFGenerator.generate

    def counting(self, request):
        asked.append(request.turns[-1].content)
        return real(self, request)

    monkeypatch.setattr(HFGenerator, "generate", counting)
    monkeypatch.setenv("MEGATRON_VITA_BACKEND", "cpu")
    return asked


def _eval(capfd, root, model, out, *extra):
    code = main(["eval", "--benchmark", "video-mme", "--data", root, "--model_path", model, "--output", out,
                 "--nframe", "4", "--max_new_tokens", "1", *extra])
    captured = capfd.readouterr()
    return code, captured.out.splitlines(), captured.err


def _records(path):
    """The complete lines of a results file (a killed run may leave a torn last line)."""
    out = []
    for line in open(path, encoding="utf-8"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _latest(path):
    return {r["question_id"]: r for r in _records(path)}


def _accuracy(path, key):
    """Independent of eval's scoring: a question is right when its latest record, without an
    error, holds the key's letter."""
    latest = _latest(path)
    right = sum(1 for qid, ans in key.items() if not latest[qid].get("error") and latest[qid]["prediction"] == ans)
    return 100.0 * right / len(key)


def _parse_last(lines):
    last = lines[-1]
    assert last.startswith("eval: accuracy="), lines
    acc, n = last[len("eval: accuracy="):].split(" n=")
    return float(acc), int(n)


def test_accuracy_resume_missing_video_and_rescore(tmp_path, capfd, calls, letter_model_dir, videos):
    rows = videomme_rows(n_videos=4, per_video=2)
    root = write_videomme(str(tmp_path / "Video-MME"), rows, videos, skip={"vid3"})
    out = str(tmp_path / "results" / "videomme.jsonl")

    # An interrupted run: only the first 3 questions.
    code, lines, _ = _eval(capfd, root, letter_model_dir, out, "--limit", "3")
    assert code == 0 and len(calls) == 3 and len(read_jsonl(out)) == 3
    assert _parse_last(lines) == (pytest.approx(_accuracy(out, {r["question_id"]: r["answer"] for r in rows[:3]}),
                                                abs=0.005), 3)

    # The full run asks only the 3 questions left that have a video; vid3's two are recorded.
    code, lines, err = _eval(capfd, root, letter_model_dir, out)
    assert code == 0 and len(calls) == 3 + 3
    assert "3 of 8 questions already answered" in err and "2 of 8 questions have no video" in err
    records = read_jsonl(out)
    assert len(records) == 8 and len({r["question_id"] for r in records}) == 8
    for r in records:
        for field in ("question_id", "answer", "prediction", "output"):
            assert field in r
    missing = [r for r in records if r.get("error")]
    assert sorted(r["question_id"] for r in missing) == ["004-1", "004-2"]
    assert all("vid3.mp4" in r["error"] and r["prediction"] == "" for r in missing)
    predictions = {r["question_id"]: r["prediction"] for r in records if not r.get("error")}
    assert set(predictions.values()) <= set("ABCD") and len(set(predictions.values())) >= 2, predictions
    for r in records:
        if not r.get("error"):
            assert r["output"].strip() == r["prediction"]  # one greedy token: the letter itself
    key = {r["question_id"]: r["answer"] for r in rows}
    acc, n = _parse_last(lines)
    assert n == 8 and acc == pytest.approx(_accuracy(out, key), abs=0.005)

    # A corrected answer key re-scores without asking the model: half the answered questions
    # now agree with the model, half do not.
    answered = sorted(predictions)
    for i, r in enumerate(rows):
        if r["question_id"] in predictions:
            p = predictions[r["question_id"]]
            r["answer"] = p if answered.index(r["question_id"]) % 2 == 0 else "ABCD"[("ABCD".index(p) + 1) % 4]
    write_videomme(root, rows, videos, skip={"vid3"})
    key = {r["question_id"]: r["answer"] for r in rows}
    code, lines, _ = _eval(capfd, root, letter_model_dir, out)
    assert code == 0 and len(calls) == 6  # nothing asked: the missing video is still missing
    acc, n = _parse_last(lines)
    expected = _accuracy(out, key)
    assert 0 < expected < 100 and acc == pytest.approx(expected, abs=0.005) and n == 8
    summary = json.load(open(str(tmp_path / "results" / "videomme.summary.json")))
    latest = _latest(out)
    for duration in ("short", "medium", "long"):
        ids = [r["question_id"] for r in rows if r["duration"] == duration]
        right = sum(latest[i]["prediction"] == key[i] and not latest[i].get("error") for i in ids)
        assert summary["groups"]["duration"][duration]["n"] == len(ids)
        assert summary["groups"]["duration"][duration]["correct"] == right
    assert summary["errors"] == 2 and summary["overall"]["n"] == 8
    # The tables come before the last line, one row per task type among others.
    assert any(line.split()[:1] == ["task_type"] for line in lines[:-1])

    # The video arrives: a rerun asks exactly its two questions.
    os.symlink(videos[3], os.path.join(root, "data", "vid3.mp4"))
    code, lines, _ = _eval(capfd, root, letter_model_dir, out)
    assert code == 0 and len(calls) == 8
    latest = _latest(out)
    assert not any(r.get("error") for r in latest.values())
    assert _parse_last(lines) == (pytest.approx(_accuracy(out, key), abs=0.005), 8)


def test_one_line_errors(tmp_path, capfd, calls, letter_model_dir, videos):
    out = str(tmp_path / "r.jsonl")
    code, _, err = _eval(capfd, str(tmp_path), letter_model_dir, out)
    assert code == 1 and err.strip().splitlines() == [
        f"megatron-vita eval: error: Video-MME annotation file {tmp_path}/videomme/test-00000-of-00001.parquet "
        f"does not exist (--data {tmp_path})"]
    root = write_videomme(str(tmp_path / "vm"), videomme_rows(1, 1), videos)
    code, _, err = _eval(capfd, root, letter_model_dir, out, "--tp", "2")
    assert code == 1 and err.strip().splitlines() == [
        f"megatron-vita eval: error: --tp applies to a Megatron checkpoint; {letter_model_dir} is an HF directory "
        "(transformers runs it in this process; megatron-vita convert makes a Megatron one)"]
    assert not os.path.exists(out) and calls == []
    code, _, err = _eval(capfd, root, str(tmp_path / "nowhere"), out, "--nframe", "0")
    assert code == 1 and err.strip().splitlines() == [
        "megatron-vita eval: error: --nframe must be >= 1, got 0",
        f"megatron-vita eval: error: --model_path {tmp_path}/nowhere: no such directory"]


def test_unreadable_video_is_recorded_not_fatal(tmp_path, capfd, calls, letter_model_dir, videos):
    rows = videomme_rows(n_videos=2, per_video=1)
    root = str(tmp_path / "Video-MME")
    os.makedirs(os.path.join(root, "data"))
    with open(os.path.join(root, "data", "vid1.mp4"), "wb") as f:
        f.write(b"not a video")  # a broken download
    write_videomme(root, rows, videos)
    out = str(tmp_path / "r.jsonl")
    code, lines, _ = _eval(capfd, root, letter_model_dir, out)
    assert code == 0 and len(calls) == 2
    latest = _latest(out)
    assert latest["002-1"]["error"].startswith("MediaError: cannot read video") and "vid1.mp4" in latest["002-1"]["error"]
    assert latest["001-1"]["prediction"] in "ABCD" and not latest["001-1"].get("error")
    acc, n = _parse_last(lines)
    assert n == 2 and acc == (50.0 if latest["001-1"]["prediction"] == rows[0]["answer"] else 0.0)
    assert "errors 1" in lines[-2]


@pytest.mark.timeout(180)
def test_killed_run_resumes_without_asking_again(tmp_path, capfd, calls, letter_model_dir, videos):
    rows = videomme_rows(n_videos=4, per_video=3)  # 12: time enough to kill mid-run
    root = write_videomme(str(tmp_path / "Video-MME"), rows, videos)
    out = str(tmp_path / "videomme.jsonl")
    cmd = [sys.executable, "-m", "megatron_vita", "eval", "--backend", "cpu", "--benchmark", "video-mme", "--data",
           root, "--model_path", letter_model_dir, "--output", out, "--nframe", "4", "--max_new_tokens", "1"]
    env = dict(os.environ, PYTHONPATH=REPO)
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=str(tmp_path))
        try:
            deadline = time.time() + 150
            while time.time() < deadline and proc.poll() is None:
                if os.path.exists(out) and open(out, "rb").read().count(b"\n") >= 1:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before it could be killed: " + open(tmp_path / "first.err").read()
            os.kill(proc.pid, signal.SIGKILL)  # kill -9 while it answers
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = [line for line in open(out, encoding="utf-8").read().split("\n") if line.strip()]
    complete = []
    for line in before:
        try:
            complete.append(json.loads(line)["question_id"])
        except json.JSONDecodeError:
            pass  # the line being written when the kill came
    assert 1 <= len(complete) < 12

    code, lines, err = _eval(capfd, root, letter_model_dir, out)
    assert code == 0
    assert f"{len(complete)} of 12 questions already answered" in err
    # Only the questions without a complete answer were asked again.
    assert len(calls) == 12 - len(complete)
    records = _records(out)
    assert sorted(r["question_id"] for r in records) == sorted(r["question_id"] for r in rows)
    assert [r["question_id"] for r in records[:len(complete)]] == complete
    acc, n = _parse_last(lines)
    assert n == 12 and acc == pytest.approx(_accuracy(out, {r["question_id"]: r["answer"] for r in rows}), abs=0.005)

