"""The three video benchmarks as released, read into `Question`s with the prompts Long-VITA was
evaluated with.

Layouts (the directory given as `--data`):

- Video-MME (lmms-lab/Video-MME): `videomme/test-00000-of-00001.parquet` with columns video_id,
  duration (short/medium/long), domain, sub_category, url, videoID, question_id, task_type,
  question, options (a list of "A. ..." strings), answer (a letter); videos as the released
  zips unpack, `data/<videoID>.mp4`, or as VLMEvalKit re-extracts them, `video/<videoID>.mp4`
  (.MP4 / .mkv as lmms-eval also accepts).
- MVBench (OpenGVLab/MVBench): `json/<task>.json`, each a list of {video, question, candidates,
  answer (the candidate's text), [start, end]}; videos under `video/<source>/` (or
  `video/data0613/<source>/`, as some zips unpack) by the task -> source table of MVBench's
  own evaluation script (`MVBENCH_TASKS`); Episodic Reasoning's
  "videos" are directories of frames (tvqa/frames_fps3_hq).
- LongVideoBench (longvideobench/LongVideoBench): `lvb_val.json`, a list of {id, video_id,
  question, candidates (or option0..option4, "N/A" when absent), correct_choice (an index),
  duration_group, question_category, video_path}; videos under `videos/`.

Prompts are the text Long-VITA's VLMEvalKit wrapper (`VLMEvalKit/long_vita_hf.py`, a video LLM:
the whole video goes in as one <video>) produced from each dataset's VLMEvalKit prompt:
Video-MME's frames template with "\\nAnswer: " dropped and "Offer a very short reply." added;
MVBench's system text and "(A) ..." options with "Only give the best option.Best option:("
replaced by "Answer with the letter."; LongVideoBench's "A. ..." options and "Answer with the
option's letter from the given choices directly." followed by "Offer a very short reply.".

A question whose video is missing is still returned (with `missing` naming the file): `eval`
records it as an error, counts it as wrong, and retries it on a rerun. A missing annotation file
is an error naming it. MVBench's start/end bounds are kept in `extra` but the whole video is
sampled (the request type has no time window).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from megatron_vita.evaluation.answers import LETTERS

VIDEO_TAG = "<video>"


@dataclass
class Question:
    question_id: str
    prompt: str  # user text with one <video> tag
    video: str  # the video file (or frame directory) the prompt's tag refers to
    options: List[str]  # option texts as shown (Video-MME's keep their "A. " letters)
    answer: str  # the correct letter
    groups: Dict[str, str] = field(default_factory=dict)  # category / duration / task type
    missing: Optional[str] = None  # why the video cannot be read, naming the file
    extra: Dict = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    name: str
    group_keys: Sequence[str]
    read: Callable[[str], List[Question]]


# ---- Video-MME ----------------------------------------------------------------------------------
VIDEOMME_ANNOTATION = os.path.join("videomme", "test-00000-of-00001.parquet")
VIDEOMME_TEMPLATE = ("\nThese are the frames of a video. Select the best answer to the following multiple-choice "
                     "question based on the video. Respond with only the letter (A, B, C, or D) of the correct "
                     "option.\n")


def videomme_prompt(question: str, options: Sequence[str]) -> str:
    body = "Question: {}\n{}\n".format(question, "\n".join(options))
    return VIDEO_TAG + VIDEOMME_TEMPLATE + body + "Offer a very short reply."


def _annotation(root: str, rel: str, benchmark: str) -> str:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{benchmark} annotation file {path} does not exist (--data {root})")
    return path


def _first_existing(paths: Sequence[str]) -> Optional[str]:
    return next((p for p in paths if os.path.exists(p)), None)


def read_videomme(root: str) -> List[Question]:
    path = _annotation(root, VIDEOMME_ANNOTATION, "Video-MME")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError("reading Video-MME's parquet needs pyarrow: pip install 'megatron-vita[eval]'") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable parquet file: {e}") from e
    need = ("videoID", "question_id", "question", "options", "answer", "duration", "domain", "sub_category",
            "task_type")
    if rows:
        absent = [c for c in need if c not in rows[0]]
        if absent:
            raise ValueError(f"{path} lacks the Video-MME column(s) {', '.join(absent)}")
    out = []
    for r in rows:
        vid = str(r["videoID"])
        candidates = [os.path.join(root, d, vid + ext) for d in ("data", "video") for ext in (".mp4", ".MP4", ".mkv")]
        video = _first_existing(candidates)
        options = [str(o) for o in r["options"]]
        out.append(Question(
            question_id=str(r["question_id"]), prompt=videomme_prompt(str(r["question"]), options),
            video=video or candidates[0], options=options, answer=str(r["answer"]).strip().upper(),
            groups={"duration": str(r["duration"]), "domain": str(r["domain"]),
                    "sub_category": str(r["sub_category"]), "task_type": str(r["task_type"])},
            missing=None if video else f"missing video {candidates[0]} (nor {candidates[3]})",
            extra={"videoID": vid}))
    return out


# ---- MVBench ------------------------------------------------------------------------------------
# task -> (annotation json, video directory under video/, "video" | "frame", has start/end), as in
# MVBench's evaluation script (OpenGVLab/Ask-Anything video_chat2, and VLMEvalKit's MVBench).
MVBENCH_TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
    "Action Count": ("action_count.json", "perception/videos", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
    "State Change": ("state_change.json", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
    "Character Order": ("character_order.json", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", "video", False),
}
MVBENCH_SYSTEM = ("\nCarefully watch the video and pay attention to the cause and sequence of events, the detail "
                  "and movement of objects, and the action and pose of persons. Based on your observations, select "
                  "the best option that accurately addresses the question.\n\n")


def mvbench_prompt(question: str, candidates: Sequence[str]) -> str:
    text = f"Question: {question}\nOptions:\n"
    text += "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(candidates))
    return MVBENCH_SYSTEM + text.rstrip() + VIDEO_TAG + "\nAnswer with the letter."


def read_mvbench(root: str) -> List[Question]:
    out = []
    for task, (name, source, kind, bounded) in MVBENCH_TASKS.items():
        path = _annotation(root, os.path.join("json", name), "MVBench")
        entries = _load_json_list(path)
        for i, e in enumerate(entries):
            where = f"{path} entry {i}"
            _require(e, ("video", "question", "candidates", "answer"), where)
            candidates = [str(c) for c in e["candidates"]]
            if e["answer"] not in candidates:
                raise ValueError(f"{where}: answer {e['answer']!r} is not one of its candidates")
            # As the zips unpack (video/<source>/...), or still under data0613/ where VLMEvalKit
            # would move them from.
            found = [p for p in (os.path.join(root, "video", source, str(e["video"])),
                                 os.path.join(root, "video", "data0613", source, str(e["video"])))
                     if (os.path.isdir(p) if kind == "frame" else os.path.isfile(p))]
            video = found[0] if found else os.path.join(root, "video", source, str(e["video"]))
            exists = bool(found)
            extra = {"source": source}
            if bounded and "start" in e and "end" in e:
                extra.update(start=e["start"], end=e["end"])
            out.append(Question(
                question_id=f"{os.path.splitext(name)[0]}/{i}", prompt=mvbench_prompt(str(e["question"]), candidates),
                video=video, options=candidates, answer=LETTERS[candidates.index(e["answer"])],
                groups={"task_type": task},
                missing=None if exists else f"missing {'frame directory' if kind == 'frame' else 'video'} {video}",
                extra=extra))
    return out


# ---- LongVideoBench -----------------------------------------------------------------------------
LVB_ANNOTATION = "lvb_val.json"
LVB_SUFFIX = "Answer with the option's letter from the given choices directly."


def longvideobench_prompt(question: str, candidates: Sequence[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(candidates))
    return f"{VIDEO_TAG}{question}\n{options}\n{LVB_SUFFIX}Offer a very short reply."


def _lvb_candidates(e: Dict, where: str) -> List[str]:
    if "candidates" in e:
        return [str(c) for c in e["candidates"]]
    found = [str(e[f"option{i}"]) for i in range(5) if f"option{i}" in e and e[f"option{i}"] != "N/A"]
    if not found:
        raise ValueError(f"{where}: no candidates (nor option0..option4)")
    return found


def read_longvideobench(root: str) -> List[Question]:
    path = _annotation(root, LVB_ANNOTATION, "LongVideoBench")
    out = []
    for i, e in enumerate(_load_json_list(path)):
        where = f"{path} entry {i}"
        _require(e, ("question", "correct_choice", "video_path"), where)
        candidates = _lvb_candidates(e, where)
        choice = int(e["correct_choice"])
        if not 0 <= choice < len(candidates):
            raise ValueError(f"{where}: correct_choice {choice} is outside its {len(candidates)} candidates")
        video = os.path.join(root, "videos", str(e["video_path"]))
        out.append(Question(
            question_id=str(e.get("id", f"{e.get('video_id', 'q')}_{i}")),
            prompt=longvideobench_prompt(str(e["question"]), candidates), video=video, options=candidates,
            answer=LETTERS[choice],
            groups={"duration_group": str(e.get("duration_group", "")),
                    "question_category": str(e.get("question_category", ""))},
            missing=None if os.path.isfile(video) else f"missing video {video}",
            extra={"video_id": e.get("video_id")}))
    return out


def _load_json_list(path: str) -> List[Dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ValueError(f"{path} must hold a JSON list of objects")
    return data


def _require(entry: Dict, keys: Sequence[str], where: str) -> None:
    absent = [k for k in keys if k not in entry]
    if absent:
        raise ValueError(f"{where} lacks {', '.join(absent)}")


BENCHMARKS = {
    "video-mme": Benchmark("video-mme", ("duration", "domain", "task_type", "sub_category"), read_videomme),
    "mvbench": Benchmark("mvbench", ("task_type",), read_mvbench),
    "longvideobench": Benchmark("longvideobench", ("duration_group", "question_category"), read_longvideobench),
}


def read_benchmark(name: str, root: str) -> List[Question]:
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root} is not a directory")
    questions = BENCHMARKS[name].read(root)
    seen = set()
    for q in questions:
        if q.question_id in seen:
            raise ValueError(f"{name}: question_id {q.question_id!r} appears twice in the annotations")
        seen.add(q.question_id)
    return questions
