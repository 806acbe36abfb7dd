"""Reading a multiple-choice answer out of a model's free text, and scoring a set of answers.

`extract_letter(output, options)` returns the option letter a reply chooses, or "" when it
chooses none. The benchmarks' own scorers (VLMEvalKit's `extract_characters_regex`, lmms-eval's
Video-MME / LongVideoBench parsers) strip a few "The answer is" prefixes and take the first
capital A-E anywhere in the text, so "A cat jumps" scores as A and "b" as nothing. The rules
here, in order, each over the text after the last "Answer:" (Long-VITA splits its output there):

1. the reply is a letter, alone or wrapped: "B", "b", "(B)", "B.", "B)", "[B]", "B: ...",
   "(b) the red one";
2. an announced choice anywhere: "the answer is B", "Answer: (C)", "option d", "choice B";
3. a parenthesised letter anywhere: "... so (C)";
4. an option's text: the reply equals one option's text, or contains exactly one option's
   text (ignoring case, punctuation and spaces);
5. a standalone capital letter among the options (not the article "A" before a word), the
   first one, as the benchmarks' regex does.

Only letters of the question's options count (a 4-option question never yields "E").
`score` turns (question, record) pairs into overall and per-group accuracy.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Phrases a model puts before its choice; matched case-insensitively and removed first.
_PREFIXES = ("the best answer is", "the correct answer is", "the answer is", "the best option is",
             "the correct option is", "best answer:", "best option:", "correct answer:", "my answer is",
             "answer:", "option:")
_ANNOUNCED = re.compile(r"\b(?:answer|option|choice)\s*(?:is|would be|:)?\s*[:\-]?\s*"
                        r"[\(\[]?([A-Za-z])[\)\]]?(?![A-Za-z])", re.IGNORECASE)
_PAREN = re.compile(r"[\(\[]([A-Za-z])[\)\]]")
_LEADING = re.compile(r"^[\s\"'*`]*[\(\[]?([A-Za-z])(?:[\)\]](?:[\s.:,;!]|$)|[.:,;!](?:\s|$)|\s*$)")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def option_letters(options: Sequence[str]) -> str:
    return LETTERS[:len(options)]


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _strip_prefixes(text: str) -> str:
    low = text.lower()
    for p in _PREFIXES:
        i = low.find(p)
        if i == 0:
            text, low = text[len(p):].lstrip(), low[len(p):].lstrip()
    return text


def extract_letter(output: str, options: Sequence[str]) -> str:
    """The option letter `output` chooses among `options` (texts without their letters), or ""."""
    valid = option_letters(options)
    if not valid:
        return ""
    text = output or ""
    if "Answer:" in text:  # Long-VITA splits its output on "Answer:" and keeps the last part
        text = text.split("Answer:")[-1]
    text = text.strip()
    if not text:
        return ""
    body = _strip_prefixes(text)
    m = _LEADING.match(body)
    if m and m.group(1).upper() in valid:
        # "A" followed by a lowercase word is the article ("A cat jumps"), not a choice.
        if not (m.group(1) == "A" and re.match(r"^\s*A\s+[a-z]", body) and body.strip() != "A"):
            return m.group(1).upper()
    for pattern in (_ANNOUNCED, _PAREN):
        for m in pattern.finditer(text):
            letter = m.group(1)
            if pattern is _ANNOUNCED and letter.islower() and re.match(r"\s+[A-Za-z]", text[m.end():]):
                continue  # "the answer is a blue circle": an article, not option (a)
            if letter.upper() in valid:
                return letter.upper()
    by_text = _by_option_text(text, options)
    if by_text:
        return by_text
    for m in _STANDALONE.finditer(text):
        letter = m.group(1)
        if letter not in valid:
            continue
        if letter == "A" and re.match(r"\s+[a-z]", text[m.end():]):
            continue  # the article
        return letter
    return ""


def _by_option_text(text: str, options: Sequence[str]) -> str:
    said = _normalize(text)
    if not said:
        return ""
    norm = [_normalize(_drop_letter(o)) for o in options]
    for i, o in enumerate(norm):
        if o and said == o:
            return LETTERS[i]
    contained = [i for i, o in enumerate(norm) if o and re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", said)]
    # An option contained in a longer one ("red" in "dark red") is not a separate match.
    contained = [i for i in contained if not any(j != i and norm[i] in norm[j] and norm[j] in said for j in contained)]
    return LETTERS[contained[0]] if len(contained) == 1 else ""


def _drop_letter(option: str) -> str:
    """ "A. text" -> "text" (Video-MME's options carry their letters)."""
    m = re.match(r"^\s*[\(\[]?[A-Z][\)\].:]\s*(.*)$", option, re.DOTALL)
    return m.group(1) if m else option


def score(pairs: Iterable[Tuple[Mapping[str, str], Mapping]], group_keys: Sequence[str]) -> Dict:
    """Accuracy overall and per value of each group key.

    pairs: (groups of a question {key: value}, its result record with "answer" and
    "prediction"). A record with an error counts as a wrong answer. Returns
    {"overall": {"n", "correct", "accuracy"}, "groups": {key: {value: {...}}}, "errors": n,
    "unparsed": n} with accuracies in percent.
    """
    overall = {"n": 0, "correct": 0}
    groups: Dict[str, "OrderedDict[str, Dict[str, int]]"] = {k: OrderedDict() for k in group_keys}
    errors = unparsed = 0
    for cats, rec in pairs:
        ok = int(bool(rec.get("prediction")) and rec.get("prediction") == rec.get("answer") and not rec.get("error"))
        errors += bool(rec.get("error"))
        unparsed += (not rec.get("error")) and not rec.get("prediction")
        overall["n"] += 1
        overall["correct"] += ok
        for k in group_keys:
            cell = groups[k].setdefault(str(cats.get(k, "")), {"n": 0, "correct": 0})
            cell["n"] += 1
            cell["correct"] += ok
    _add_accuracy(overall)
    for table in groups.values():
        for cell in table.values():
            _add_accuracy(cell)
    return {"overall": overall, "groups": {k: dict(sorted(v.items())) for k, v in groups.items()},
            "errors": errors, "unparsed": unparsed}


def _add_accuracy(cell: Dict) -> None:
    cell["accuracy"] = round(100.0 * cell["correct"] / cell["n"], 2) if cell["n"] else 0.0


def format_table(summary: Dict) -> List[str]:
    """The summary as text tables: one block per group key, then the overall line."""
    lines: List[str] = []
    for key, table in summary["groups"].items():
        if not table:
            continue
        width = max(len(key), *(len(v) for v in table))
        lines.append(f"{key:<{width}}  {'n':>6}  {'correct':>7}  {'acc %':>6}")
        for value, cell in table.items():
            lines.append(f"{value:<{width}}  {cell['n']:>6}  {cell['correct']:>7}  {cell['accuracy']:>6.2f}")
        lines.append("")
    o = summary["overall"]
    lines.append(f"overall: {o['correct']}/{o['n']} correct = {o['accuracy']:.2f}%"
                 f" (errors {summary['errors']}, no letter found {summary['unparsed']})")
    return lines
