"""Fixtures of the eval tests: a tiny Long-VITA that answers with a letter, and writers of the
three benchmarks' released layouts (annotation files as released, real MP4s).

`letter_model_dir`: the tiny random checkpoint (`create_tiny`) with a tokenizer (the demo's
byte-level BPE), whose LM-head rows for the tokens "A".."D" are made large: greedy decoding
then answers each question with one of the four letters, which one depending on the prompt and
the video (the final hidden state), so accuracy against an answer key is neither 0 nor 100 by
construction. The weights are a real checkpoint loaded by transformers; nothing is stubbed.
"""
import os

import pytest

import megatron_vita  # noqa: F401  (registers the Long-VITA HF classes)

CORPUS = [
    "You are a helpful assistant.", "These are the frames of a video.", "Question: What colour is the bar?",
    "Select the best answer to the following multiple-choice question based on the video.",
    "Respond with only the letter (A, B, C, or D) of the correct option.", "Offer a very short reply.",
    "A. red B. green C. blue D. yellow", "Answer with the letter.", "user", "assistant", "system", "\n",
]
LETTERS = "ABCD"


@pytest.fixture(scope="session")
def letter_model_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_vita.data.demo import train_tokenizer
    from megatron_vita.hf.tiny import create_tiny

    base = str(tmp_path_factory.mktemp("tiny_base"))
    create_tiny(base, preset="tiny", seed=0)
    out = str(tmp_path_factory.mktemp("tiny_letter_model"))
    tok = train_tokenizer(CORPUS * 4, out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = [tok.convert_tokens_to_ids(c) for c in LETTERS]
    assert len(set(ids)) == 4 and all(isinstance(i, int) and i >= 0 for i in ids), ids
    head = model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in ids:
            head[i] = torch.randn(head.shape[1], generator=gen) * 20.0
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """Four real H.264 MP4s of different lengths (the bar moves further in longer ones)."""
    from mv_testlib import write_mp4

    root = str(tmp_path_factory.mktemp("videos"))
    paths = []
    for i, frames in enumerate((4, 6, 9, 12)):  # write_mp4 draws at most 12 frames
        path = os.path.join(root, f"clip{i}.mp4")
        write_mp4(path, frames=frames, fps=4)
        paths.append(path)
    return paths
