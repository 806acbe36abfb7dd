"""Writers of the benchmarks' released layouts for the eval tests (annotation files as released,
videos as links to real MP4s), and a JSON-lines reader."""
import json
import os

LETTERS = "ABCD"


VIDEOMME_COLUMNS = ("video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type",
                    "question", "options", "answer")


def videomme_rows(n_videos: int = 3, per_video: int = 2):
    """Rows as in lmms-lab/Video-MME's parquet (three questions per video there; fewer here)."""
    durations, domains = ("short", "medium", "long"), ("Knowledge", "Sports Competition", "Life Record")
    tasks = ("Counting Problem", "Object Recognition", "Temporal Perception")
    colours = ("red", "green", "blue", "yellow")
    rows = []
    for v in range(n_videos):
        for k in range(per_video):
            rows.append({
                "video_id": f"{v + 1:03d}", "duration": durations[v % 3], "domain": domains[v % 3],
                "sub_category": f"Sub {v % 2}", "url": f"https://www.youtube.com/watch?v=vid{v}",
                "videoID": f"vid{v}", "question_id": f"{v + 1:03d}-{k + 1}", "task_type": tasks[(v + k) % 3],
                "question": f"What colour is the bar in part {k + 1}?" if k % 2 == 0 else "How many bars move?",
                "options": [f"{L}. {colours[(j + k + v) % 4]}" for j, L in enumerate(LETTERS)],
                "answer": LETTERS[(v + k) % 4],
            })
    return rows


def write_videomme(root: str, rows, videos, video_dir: str = "data", skip=()):
    """`videomme/test-00000-of-00001.parquet` + `<video_dir>/<videoID>.mp4` (links to real MP4s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(root, "videomme"), exist_ok=True)
    table = pa.table({c: [r[c] for r in rows] for c in VIDEOMME_COLUMNS})
    pq.write_table(table, os.path.join(root, "videomme", "test-00000-of-00001.parquet"))
    os.makedirs(os.path.join(root, video_dir), exist_ok=True)
    ids = sorted({r["videoID"] for r in rows})
    for i, vid in enumerate(ids):
        target = os.path.join(root, video_dir, vid + ".mp4")
        if vid not in skip and not os.path.exists(target):
            os.symlink(videos[i % len(videos)], target)
    return root


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def read_jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
