"""The synthetic demo dataset: coloured shapes, moving shapes, text, a tiny tokenizer, a held-out split.

Owns `make_demo(out)`, behind `megatron-vita data make-demo OUT`. Everything is generated from
one seed (same seed, same bytes) in a few seconds, sized so that the `tiny` model preset (56px
tiles, 4 feature tokens per tile, vocabulary 512) can learn it in minutes on 2 CPU cores:

    OUT/demo.json                 manifest: files, counts, seed, answer sets
    OUT/tokenizer/                HF tokenizer (byte-level BPE trained on the demo text) with
                                  <|endoftext|> <|im_start|> <|im_end|> and the 17 Long-VITA tokens
                                  as the last 20 ids of a 512 vocabulary (= TokenIds.at_end_of_vocab(512))
    OUT/train/{image_colour,image_shape,video_motion,text}.jsonl   Long-VITA JSONL
    OUT/train/images/*.png|jpg, OUT/train/videos/*.mp4, OUT/train/frames/<clip>/*.jpg
    OUT/heldout/heldout.jsonl     unseen images/videos; each record adds "qtype" and "answer"
    OUT/heldout/meta.json         per question type: the answer set (and token ids), the count and the chance level

Question types (closed answer sets): colour (6 colours), shape (3 shapes), motion (4 directions).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
    "yellow": (235, 220, 50), "purple": (150, 60, 200), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour is the object?", "Tell me the colour of the shape."),
    "shape": ("What shape is this?", "Which shape do you see?", "Name the shape in the picture."),
    "motion": ("Which way does the shape move?", "In which direction is the object moving?"),
}
ANSWERS = {"colour": list(COLOURS), "shape": list(SHAPES), "motion": list(DIRECTIONS)}
TEXT_FACTS = (
    ("What is the opposite of left?", "right"), ("What is the opposite of right?", "left"),
    ("What is the opposite of up?", "down"), ("What is the opposite of down?", "up"),
    ("What colour is grass?", "green"), ("What colour is the sky?", "blue"), ("What colour is snow?", "white"),
    ("How many sides does a triangle have?", "three"), ("How many sides does a square have?", "four"),
    ("Which shape has no corners?", "circle"), ("Which shape has three corners?", "triangle"),
    ("Say hello.", "hello"),
)
SIZE = 56  # the tiny preset's tile size: one tile per image, no resize
VOCAB = 512
VIDEO_FRAMES, VIDEO_FPS = 8, 2  # sampled at <= 1 fps with max 4 frames: indices 0, 2, 4, 6
FRAME_DIR_FRAMES = 4


def _canvas(rng) -> np.ndarray:
    base = rng.integers(0, 70)
    return np.clip(base + rng.normal(0, 6, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _draw(arr: np.ndarray, shape: str, colour: str, cx: float, cy: float, r: float, rng) -> Image.Image:
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    return img


def _still(rng) -> Tuple[Image.Image, str, str]:
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    # Large shapes: a 2-layer ViT and a 4-layer LLM trained from scratch for a few minutes must
    # see them; at 11-18 px the demo learned colour but not shape or motion in that budget.
    r = rng.uniform(16, 22)
    cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
    return _draw(_canvas(rng), shape, colour, cx, cy, r, rng), shape, colour


def _motion_frames(rng, n: int) -> Tuple[List[np.ndarray], str]:
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    r = rng.uniform(10, 13)  # moving shapes: large enough to move between feature tokens
    lo, hi = r + 2, SIZE - r - 2
    across = rng.uniform(lo, hi)
    path = np.linspace(lo, hi, n) if direction in ("right", "down") else np.linspace(hi, lo, n)
    bg = _canvas(rng)
    frames = []
    for t in range(n):
        cx, cy = (path[t], across) if direction in ("left", "right") else (across, path[t])
        frames.append(np.asarray(_draw(bg.copy(), shape, colour, cx, cy, r, np.random.default_rng(0))))
    return frames, direction


def write_mp4(path: str, frames: List[np.ndarray], fps: int) -> None:
    """H.264 MP4 with PyAV: identical bytes for identical frames.

    x264's default rate control (CRF with macroblock-tree) is not bit-reproducible run to run;
    a constant quantiser with one thread is.
    """
    import av

    with av.open(path, mode="w") as c:
        s = c.add_stream("libx264", rate=fps, options={"threads": "1", "qp": "18"})
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _record(question: str, reply: str, tag: str = "", media: Dict[str, List[str]] = None, extra: dict = None) -> dict:
    user = f"{tag}\n{question}" if tag else question
    rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
    rec.update(media or {})
    rec.update(extra or {})
    return rec


def _make_split(out: str, split: str, rng, counts: Dict[str, int], heldout: bool) -> Dict[str, List[dict]]:
    base = os.path.join(out, split)
    for sub in ("images", "videos", "frames"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    recs: Dict[str, List[dict]] = {k: [] for k in ("image_colour", "image_shape", "video_motion")}
    for qtype, key, ext in (("colour", "image_colour", "png"), ("shape", "image_shape", "jpg")):
        for i in range(counts[key]):
            img, shape, colour = _still(rng)
            rel = f"{split}/images/{qtype}_{i:04d}.{ext}"
            img.save(os.path.join(out, rel), **({"quality": 95} if ext == "jpg" else {}))
            answer = colour if qtype == "colour" else shape
            q = QUESTIONS[qtype][rng.integers(len(QUESTIONS[qtype]))]
            extra = {"qtype": qtype, "answer": answer} if heldout else {}
            recs[key].append(_record(q, answer, "<image>", {"images": [rel]}, extra))
    for i in range(counts["video_motion"]):
        as_dir = i % 5 == 4  # every fifth clip is a frame directory
        frames, direction = _motion_frames(rng, FRAME_DIR_FRAMES if as_dir else VIDEO_FRAMES)
        if as_dir:
            rel = f"{split}/frames/clip_{i:04d}"
            os.makedirs(os.path.join(out, rel), exist_ok=True)
            for t, f in enumerate(frames):
                Image.fromarray(f).save(os.path.join(out, rel, f"frame_{t + 1}.jpg"), quality=95)
        else:
            rel = f"{split}/videos/clip_{i:04d}.mp4"
            write_mp4(os.path.join(out, rel), frames, VIDEO_FPS)
        q = QUESTIONS["motion"][rng.integers(len(QUESTIONS["motion"]))]
        extra = {"qtype": "motion", "answer": direction} if heldout else {}
        recs["video_motion"].append(_record(q, direction, "<video>", {"videos": [rel]}, extra))
    return recs


def _write_jsonl(path: str, records: List[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def train_tokenizer(texts: List[str], out_dir: str):
    """Byte-level BPE on the demo text; ChatML + the 17 Long-VITA tokens are the last 20 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_vita.config.model import SPECIAL_TOKENS
    from megatron_vita.data.template import CHATML_TOKENS

    added = list(CHATML_TOKENS) + list(SPECIAL_TOKENS)
    base = VOCAB - len(added)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() < base:
        # A small corpus runs out of merges: fill with unused tokens so the specials land on fixed ids.
        tok.add_special_tokens([f"<|unused_{i}|>" for i in range(base - tok.get_vocab_size())])
    tok.add_special_tokens(added)
    if tok.get_vocab_size() != VOCAB or tok.token_to_id("<|endoftext|>") != base:
        raise RuntimeError(f"demo tokenizer layout is off: vocab {tok.get_vocab_size()}, "
                           f"<|endoftext|> at {tok.token_to_id('<|endoftext|>')}, expected {VOCAB} / {base}")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    hf.save_pretrained(out_dir)
    return hf


def make_demo(out: str, seed: int = 0, scale: float = 1.0, overwrite: bool = False) -> dict:
    """Generate the demo dataset under `out`; returns the manifest (also written to demo.json)."""
    if os.path.exists(os.path.join(out, "demo.json")) and not overwrite:
        raise FileExistsError(f"{out} already holds a demo dataset (demo.json); pass --overwrite to regenerate")
    os.makedirs(out, exist_ok=True)
    n = lambda k: max(2, int(round(k * scale)))  # noqa: E731
    train_counts = {"image_colour": n(600), "image_shape": n(600), "video_motion": n(300)}
    held_counts = {"image_colour": n(60), "image_shape": n(60), "video_motion": n(40)}
    train = _make_split(out, "train", np.random.default_rng([seed, 1]), train_counts, heldout=False)
    held = _make_split(out, "heldout", np.random.default_rng([seed, 2]), held_counts, heldout=True)
    rng = np.random.default_rng([seed, 3])
    text = [_record(*TEXT_FACTS[rng.integers(len(TEXT_FACTS))]) for _ in range(n(150))]
    for key, recs in train.items():
        _write_jsonl(os.path.join(out, "train", f"{key}.jsonl"), recs)
    _write_jsonl(os.path.join(out, "train", "text.jsonl"), text)
    held_all = held["image_colour"] + held["image_shape"] + held["video_motion"]
    _write_jsonl(os.path.join(out, "heldout", "heldout.jsonl"), held_all)
    corpus = [m["content"] for recs in list(train.values()) + [text, held_all] for r in recs for m in r["messages"]]
    corpus += ["user", "assistant", "system", "You are a helpful assistant.", "\n"]
    hf = train_tokenizer(corpus, os.path.join(out, "tokenizer"))
    meta = {"question_types": {}, "num_samples": len(held_all),
            "note": "records carry qtype and answer; accuracy = exact match of the answer word"}
    for qtype, answers in ANSWERS.items():
        count = sum(1 for r in held_all if r["qtype"] == qtype)
        meta["question_types"][qtype] = {
            "answers": answers, "count": count, "chance": 1.0 / len(answers),
            # Token ids of each answer (single tokens on the demo corpus): lets scoring compare logits.
            "answer_token_ids": [hf(a, add_special_tokens=False)["input_ids"] for a in answers],
        }
    meta["chance_overall"] = sum(v["count"] * v["chance"] for v in meta["question_types"].values()) / len(held_all)
    with open(os.path.join(out, "heldout", "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    manifest = {
        "seed": seed, "scale": scale, "tokenizer": "tokenizer", "model_preset": "tiny", "image_size": SIZE,
        "train": {k: {"file": f"train/{k}.jsonl", "count": len(v)} for k, v in list(train.items()) + [("text", text)]},
        "heldout": {"file": "heldout/heldout.jsonl", "meta": "heldout/meta.json", "count": len(held_all)},
        "answers": ANSWERS,
    }
    with open(os.path.join(out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest
