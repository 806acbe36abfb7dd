"""The resumable results file: what counts as done, torn lines of a killed run, refusing to mix
runs, and scoring against the annotations as they are now."""
import json

import pytest

from megatron_vita.evaluation.benchmarks import Question
from megatron_vita.evaluation.results import ResultsFile, is_done, summarize


def _rec(qid, prediction="A", answer="A", **extra):
    return {"question_id": qid, "answer": answer, "prediction": prediction, "output": prediction,
            "benchmark": "video-mme", "nframe": 8, **extra}


def test_last_record_wins_and_errors_are_not_done(tmp_path):
    path = str(tmp_path / "sub" / "r.jsonl")
    rf = ResultsFile(path, "video-mme", 8)
    assert rf.load() == {}
    rf.append(_rec("1", error="missing video /x/data/v.mp4", prediction=""))
    rf.append(_rec("2", prediction="B"))
    assert not is_done(rf.load()["1"]) and is_done(rf.load()["2"])
    rf.append(_rec("1", prediction="C"))
    records = rf.load()
    assert records["1"]["prediction"] == "C" and is_done(records["1"])


def test_torn_last_line_is_ignored_and_the_next_line_starts_fresh(tmp_path):
    path = str(tmp_path / "r.jsonl")
    rf = ResultsFile(path, "video-mme", 8)
    rf.append(_rec("1"))
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_rec("2"))[:25])  # a process killed in the middle of a line
    records = rf.load()
    assert list(records) == ["1"] and rf.torn_lines == 1
    rf.append(_rec("2"))
    rf2 = ResultsFile(path, "video-mme", 8)
    assert sorted(rf2.load()) == ["1", "2"] and rf2.torn_lines == 1
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["question_id"] == "2"


def test_another_benchmark_or_nframe_is_refused(tmp_path):
    path = str(tmp_path / "r.jsonl")
    ResultsFile(path, "video-mme", 8).append(_rec("1"))
    with pytest.raises(ValueError, match="holds results for benchmark 'video-mme', not --benchmark 'mvbench'"):
        ResultsFile(path, "mvbench", 8).load()
    with pytest.raises(ValueError, match="nframe 8, not --nframe 64"):
        ResultsFile(path, "video-mme", 64).load()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"no_id": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not an eval result"):
        ResultsFile(path, "video-mme", 8).load()


def test_summary_scores_against_the_current_answer_key():
    qs = [Question(str(i), "p", "v", ["a", "b"], answer, {"duration": d})
          for i, (answer, d) in enumerate([("A", "short"), ("B", "short"), ("B", "long")])]
    records = {"0": _rec("0", "A", answer="B"), "1": _rec("1", "B"), "2": _rec("2", "")}
    s = summarize(qs, records, ("duration",), "video-mme")
    # Question 0 was recorded under an older key (B); the current key (A) decides.
    assert s["overall"] == {"n": 3, "correct": 2, "accuracy": 66.67}
    assert s["groups"]["duration"] == {"long": {"n": 1, "correct": 0, "accuracy": 0.0},
                                       "short": {"n": 2, "correct": 2, "accuracy": 100.0}}
