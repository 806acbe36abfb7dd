"""The readers on small layouts written as each benchmark releases them: Video-MME's parquet,
MVBench's json/ + video/<source>/ (with a frame-directory source), LongVideoBench's lvb_val.json."""
import os

import pytest

from eval_layouts import videomme_rows, write_json, write_videomme
from megatron_vita.evaluation.benchmarks import MVBENCH_TASKS, read_benchmark


def test_videomme_as_released(tmp_path, videos):
    rows = videomme_rows(n_videos=3, per_video=2)
    root = write_videomme(str(tmp_path), rows, videos, video_dir="data", skip={"vid2"})
    qs = read_benchmark("video-mme", root)
    assert [q.question_id for q in qs] == [r["question_id"] for r in rows]
    q = qs[0]
    assert q.video == os.path.join(root, "data", "vid0.mp4") and q.missing is None
    assert q.answer == rows[0]["answer"] and q.options == rows[0]["options"]
    assert q.groups == {"duration": "short", "domain": "Knowledge", "sub_category": "Sub 0",
                        "task_type": rows[0]["task_type"]}
    # The prompt Long-VITA's VLMEvalKit run built: <video>, the frames template, the question and
    # its options one per line, "Offer a very short reply." ("\nAnswer: " removed).
    assert q.prompt == (
        "<video>\nThese are the frames of a video. Select the best answer to the following multiple-choice question "
        "based on the video. Respond with only the letter (A, B, C, or D) of the correct option.\n"
        f"Question: {rows[0]['question']}\n" + "\n".join(rows[0]["options"]) + "\nOffer a very short reply.")
    # vid2 has no file: its questions are kept and say which file is missing.
    missing = [q for q in qs if q.missing]
    assert [q.question_id for q in missing] == ["003-1", "003-2"]
    assert os.path.join(root, "data", "vid2.mp4") in missing[0].missing


def test_videomme_video_dir_layout(tmp_path, videos):
    # VLMEvalKit re-extracts the zips into video/ instead of data/.
    root = write_videomme(str(tmp_path), videomme_rows(2, 1), videos, video_dir="video")
    qs = read_benchmark("video-mme", root)
    assert all(q.missing is None and "/video/" in q.video for q in qs)


def test_videomme_bad_annotations(tmp_path, videos):
    with pytest.raises(FileNotFoundError, match="videomme/test-00000-of-00001.parquet does not exist"):
        read_benchmark("video-mme", str(tmp_path))
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / "videomme")
    pq.write_table(pa.table({"videoID": ["x"], "question": ["q"]}), str(tmp_path / "videomme" / "test-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="lacks the Video-MME column"):
        read_benchmark("video-mme", str(tmp_path))


def _mvbench(root, videos, frame_files=3):
    """Every task's json (one or two entries each), videos under video/<source>/, Episodic
    Reasoning as a directory of JPEG frames."""
    from PIL import Image

    for task, (name, source, kind, bounded) in MVBENCH_TASKS.items():
        entries = []
        for i in range(2 if task == "Action Count" else 1):
            video = f"{name[:-5]}_{i}" + ("" if kind == "frame" else ".mp4")
            entry = {"video": video, "question": f"What happens in {task}?", "candidates": ["walks", "runs", "sits"],
                     "answer": ["walks", "runs", "sits"][i + 1]}
            if bounded:
                entry.update(start=1.5, end=9.0)
            entries.append(entry)
            path = os.path.join(root, "video", source, video)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if kind == "frame":
                os.makedirs(path, exist_ok=True)
                for k in range(1, frame_files + 1):
                    Image.new("RGB", (32, 24), (10 * k, 0, 0)).save(os.path.join(path, f"{k:05d}.jpg"))
            elif not (task == "Action Count" and i == 1):  # one video left missing
                os.symlink(videos[i], path)
        write_json(os.path.join(root, "json", name), entries)
    return root


def test_mvbench_as_released(tmp_path, videos):
    root = _mvbench(str(tmp_path), videos)
    qs = read_benchmark("mvbench", root)
    assert len(qs) == 21
    by_id = {q.question_id: q for q in qs}
    q = by_id["action_count/0"]
    assert q.video == os.path.join(root, "video", "perception", "videos", "action_count_0.mp4")
    assert q.answer == "B" and q.groups == {"task_type": "Action Count"} and q.missing is None
    assert q.prompt == (
        "\nCarefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
        "objects, and the action and pose of persons. Based on your observations, select the best option that "
        "accurately addresses the question.\n\nQuestion: What happens in Action Count?\nOptions:\n(A) walks\n(B) runs\n"
        "(C) sits<video>\nAnswer with the letter.")
    assert by_id["action_count/1"].answer == "C" and "missing video" in by_id["action_count/1"].missing
    ep = by_id["episodic_reasoning/0"]
    assert os.path.isdir(ep.video) and ep.missing is None and ep.extra["start"] == 1.5
    assert by_id["action_sequence/0"].extra == {"source": "star/Charades_v1_480", "start": 1.5, "end": 9.0}
    # Some zips unpack under video/data0613/<source>/.
    moved = os.path.join(root, "video", "data0613", "perception", "videos", "action_count_1.mp4")
    os.makedirs(os.path.dirname(moved))
    os.symlink(videos[1], moved)
    q = {q.question_id: q for q in read_benchmark("mvbench", root)}["action_count/1"]
    assert q.missing is None and q.video == moved


def test_mvbench_bad_annotations(tmp_path, videos):
    root = _mvbench(str(tmp_path), videos)
    os.remove(os.path.join(root, "json", "state_change.json"))
    with pytest.raises(FileNotFoundError, match="json/state_change.json does not exist"):
        read_benchmark("mvbench", root)
    write_json(os.path.join(root, "json", "state_change.json"),
               [{"video": "x.mp4", "question": "q", "candidates": ["a", "b"], "answer": "c"}])
    with pytest.raises(ValueError, match="state_change.json entry 0: answer 'c' is not one of its candidates"):
        read_benchmark("mvbench", root)


def test_longvideobench_as_released(tmp_path, videos):
    root = str(tmp_path)
    entries = [
        {"id": "86CxyhFV9MI_0", "video_id": "86CxyhFV9MI", "question": "What is the man holding?",
         "candidates": ["a cup", "a phone", "a book", "nothing"], "correct_choice": 2, "duration_group": 600,
         "question_category": "E2O", "video_path": "86CxyhFV9MI.mp4", "duration": 527.0},
        # the parquet-style record: option0..option4 with "N/A"
        {"id": "x_1", "video_id": "x", "question": "Which colour?", "option0": "red", "option1": "green",
         "option2": "N/A", "option3": "N/A", "option4": "N/A", "correct_choice": 1, "duration_group": 15,
         "question_category": "S2A", "video_path": "x.mp4"},
    ]
    write_json(os.path.join(root, "lvb_val.json"), entries)
    os.makedirs(os.path.join(root, "videos"))
    os.symlink(videos[0], os.path.join(root, "videos", "86CxyhFV9MI.mp4"))
    qs = read_benchmark("longvideobench", root)
    assert [q.question_id for q in qs] == ["86CxyhFV9MI_0", "x_1"]
    assert qs[0].answer == "C" and qs[0].groups == {"duration_group": "600", "question_category": "E2O"}
    assert qs[0].prompt == ("<video>What is the man holding?\nA. a cup\nB. a phone\nC. a book\nD. nothing\n"
                            "Answer with the option's letter from the given choices directly.Offer a very short reply.")
    assert qs[1].options == ["red", "green"] and qs[1].answer == "B"
    assert qs[1].missing and os.path.join(root, "videos", "x.mp4") in qs[1].missing
    with pytest.raises(FileNotFoundError, match="lvb_val.json does not exist"):
        read_benchmark("longvideobench", str(tmp_path / "videos"))
