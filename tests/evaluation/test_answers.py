"""Letter extraction from free-text replies, and accuracy per group."""
import pytest

from megatron_vita.evaluation.answers import extract_letter, format_table, score

OPTIONS = ["red square", "blue circle", "green bar moving right", "dark red"]
VIDEOMME_OPTIONS = ["A. red square", "B. blue circle", "C. green bar moving right", "D. dark red"]

CASES = [
    # a letter alone or wrapped
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("b.", "B"), ("B)", "B"), ("[C]", "C"), ('"D"', "D"),
    ("**B**", "B"), ("C: green bar", "C"), ("(b) the blue one", "B"), ("B, because it moves", "B"), ("a", "A"),
    ("A", "A"), ("A. red square", "A"),
    # announced
    ("The answer is B", "B"), ("The answer is (C).", "C"), ("Answer: C", "C"), ("I think the answer is d.", "D"),
    ("option c", "C"), ("Best option:(B) blue circle", "B"), ("The correct answer is: D", "D"),
    ("Answer: The answer is A", "A"), ("so the choice would be (B)", "B"), ("The answer is a", "A"),
    # the option's text
    ("blue circle", "B"), ("It is the blue circle.", "B"), ("The green bar moving right", "C"), ("dark red", "D"),
    ("Red square", "A"), ("The answer is a blue circle", "B"),
    # a standalone letter somewhere
    ("The video shows B", "B"),
    # nothing
    ("A cat jumps over the fence", ""), ("nothing fits", ""), ("E", ""), ("", ""), ("I", ""), ("   ", ""),
    ("red", ""),  # contained in two options ("red square", "dark red"): ambiguous
]


@pytest.mark.parametrize("reply,letter", CASES)
def test_extract_letter(reply, letter):
    assert extract_letter(reply, OPTIONS) == letter
    # Video-MME's options carry their letters; the result is the same.
    assert extract_letter(reply, VIDEOMME_OPTIONS) == letter


def test_only_letters_of_the_options_count():
    assert extract_letter("D", ["yes", "no"]) == ""
    assert extract_letter("The answer is E", OPTIONS + ["none"]) == "E"
    assert extract_letter("(E)", OPTIONS) == ""
    assert extract_letter("B", []) == ""


def test_long_vita_answer_split_keeps_the_last_part():
    # Long-VITA splits the output on "Answer:"; a letter in the reasoning before it does not count.
    assert extract_letter("Option A looks wrong. Answer: C", OPTIONS) == "C"


def test_score_groups_and_errors():
    pairs = [
        ({"duration": "short", "task": "count"}, {"answer": "A", "prediction": "A"}),
        ({"duration": "short", "task": "ocr"}, {"answer": "B", "prediction": "C"}),
        ({"duration": "long", "task": "count"}, {"answer": "C", "prediction": ""}),
        ({"duration": "long", "task": "count"}, {"answer": "D", "prediction": "D", "error": "missing video x"}),
        ({"duration": "long", "task": "ocr"}, {"answer": "D", "prediction": "D"}),
    ]
    s = score(pairs, ("duration", "task"))
    assert s["overall"] == {"n": 5, "correct": 2, "accuracy": 40.0}
    assert s["groups"]["duration"]["short"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    assert s["groups"]["duration"]["long"] == {"n": 3, "correct": 1, "accuracy": 33.33}
    assert s["groups"]["task"]["count"] == {"n": 3, "correct": 1, "accuracy": 33.33}
    assert s["errors"] == 1 and s["unparsed"] == 1
    lines = format_table(s)
    assert lines[0].split() == ["duration", "n", "correct", "acc", "%"]
    assert any(line.split() == ["long", "3", "1", "33.33"] for line in lines)
    assert lines[-1].startswith("overall: 2/5 correct = 40.00%")
