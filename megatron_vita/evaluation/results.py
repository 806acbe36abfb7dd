"""The resumable results file and the loop that fills it.

The file (`--output`) holds JSON lines, one per answered question, appended and flushed to disk
as each answer comes: {question_id, answer, prediction (the extracted letter, "" when none),
output (the model's raw text), correct, groups, benchmark, nframe, finish_reason, prompt_tokens}
and `error` when the question could not be asked (missing video, unreadable media, a prompt
longer than --max_seq_len). A rerun with the same file reads it first and asks only what is
not done; a question with an error is asked again (the video may have been added since), its
new line superseding the old. A process killed mid-line leaves a torn last line: it is ignored
(and the next line starts on a fresh one), so at most the answer being written is asked again.
A file written for another benchmark or another --nframe is refused rather than mixed.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Iterable, List, Optional, TextIO

from megatron_vita.evaluation.answers import extract_letter, format_table, score
from megatron_vita.evaluation.benchmarks import Question


class ResultsFile:
    """Append-only JSON lines; the last record of a question_id wins."""

    def __init__(self, path: str, benchmark: str, nframe: int):
        self.path = path
        self.benchmark = benchmark
        self.nframe = nframe
        self.torn_lines = 0

    def load(self) -> Dict[str, dict]:
        records: Dict[str, dict] = {}
        if not os.path.exists(self.path):
            return records
        if os.path.isdir(self.path):
            raise ValueError(f"--output {self.path} is a directory; give a file")
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self.torn_lines += 1  # a line cut short by a killed run
                    continue
                if not isinstance(rec, dict) or "question_id" not in rec:
                    raise ValueError(f"{self.path} line {n} is not an eval result (no question_id)")
                for key, mine in (("benchmark", self.benchmark), ("nframe", self.nframe)):
                    if key in rec and rec[key] != mine:
                        flag = "--benchmark" if key == "benchmark" else "--nframe"
                        raise ValueError(f"--output {self.path} holds results for {key} {rec[key]!r}, not "
                                         f"{flag} {mine!r}; give another --output (or the same {flag})")
                records[str(rec["question_id"])] = rec
        return records

    def append(self, record: dict) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        needs_newline = False
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if needs_newline else "") + json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def is_done(record: Optional[dict]) -> bool:
    return record is not None and not record.get("error")


def make_request(q: Question, nframe: int, max_new_tokens: int, max_seq_len: Optional[int]):
    """The GenerationRequest of one question: one user turn, its video, greedy decoding."""
    from megatron_vita.inference.api import GenerationRequest, SamplingParams, Turn

    return GenerationRequest([Turn("user", q.prompt)], videos=[q.video],
                             sampling=SamplingParams(max_new_tokens=max_new_tokens), max_num_frame=nframe,
                             max_seq_len=max_seq_len)


def base_record(q: Question, benchmark: str, nframe: int) -> dict:
    return {"question_id": q.question_id, "answer": q.answer, "benchmark": benchmark, "nframe": nframe,
            "groups": q.groups}


def ask(q: Question, generator, benchmark: str, nframe: int, max_new_tokens: int,
        max_seq_len: Optional[int]) -> dict:
    """One question's result record; a question that cannot be asked gets an `error`."""
    rec = base_record(q, benchmark, nframe)
    if q.missing:
        return {**rec, "prediction": "", "output": None, "correct": False, "error": q.missing}
    request = make_request(q, nframe, max_new_tokens, max_seq_len)
    try:
        result = generator.generate(request)
    except (ValueError, OSError) as e:
        # Bad media (MediaError / SampleError are ValueErrors), an unreadable file, a prompt over
        # --max_seq_len: this question is recorded as failed and the run goes on.
        return {**rec, "prediction": "", "output": None, "correct": False,
                "error": f"{type(e).__name__}: {e}"}
    prediction = extract_letter(result.text, q.options)
    return {**rec, "prediction": prediction, "output": result.text, "correct": prediction == q.answer,
            "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens}


def pending(questions: List[Question], records: Dict[str, dict]) -> List[Question]:
    """The questions a run still has to ask: no record, or a record with an error."""
    return [q for q in questions if not is_done(records.get(q.question_id))]


def run_questions(questions: List[Question], generator, results: ResultsFile, benchmark: str, nframe: int,
                  max_new_tokens: int, max_seq_len: Optional[int], log: Optional[TextIO] = None) -> Dict[str, dict]:
    """Ask every question not yet done, appending each record as it comes; returns the records of
    `questions` by id. `generator` may be None when every pending question lacks its video."""
    log = log or sys.stderr  # looked up per call: the process may have redirected it since import
    records = results.load()
    todo = pending(questions, records)
    done = len(questions) - len(todo)
    if results.torn_lines:
        print(f"eval: {results.path}: ignored {results.torn_lines} incomplete line(s) of an interrupted run",
              file=log)
    if done:
        print(f"eval: resuming {results.path}: {done} of {len(questions)} questions already answered", file=log)
    for i, q in enumerate(todo, 1):
        rec = ask(q, generator, benchmark, nframe, max_new_tokens, max_seq_len)
        results.append(rec)
        records[q.question_id] = rec
        status = f"error: {rec['error']}" if rec.get("error") else \
            f"prediction={rec['prediction'] or '-'} answer={rec['answer']}"
        print(f"eval: [{done + i}/{len(questions)}] {q.question_id} {status}", file=log, flush=True)
    return {q.question_id: records[q.question_id] for q in questions}


def summarize(questions: Iterable[Question], records: Dict[str, dict], group_keys, benchmark: str) -> Dict:
    # Scored against the annotations as they are now (a corrected answer key re-scores a finished
    # run without asking the model again); the prediction is the recorded one.
    summary = score(((q.groups, {**records[q.question_id], "answer": q.answer}) for q in questions), group_keys)
    summary["benchmark"] = benchmark
    return summary


def write_summary(path: str, summary: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def report_lines(summary: Dict) -> List[str]:
    """The tables, then the last line scripts read: `eval: accuracy=<percent> n=<questions>`."""
    o = summary["overall"]
    return format_table(summary) + [f"eval: accuracy={o['accuracy']:.2f} n={o['n']}"]
