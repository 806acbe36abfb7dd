"""The HF inference path: prompts built by the training pipeline, HFGenerator against a plain
argmax loop, streaming, chat history, and `megatron-vita infer` (stdout is the answer only, every
bad input refused in one line before a model loads)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_vita.inference.api import GenerationRequest, SamplingParams, Turn, single_turn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from megatron_vita.inference.hf_generator import HFGenerator

    return HFGenerator(tiny_model_dir, backend="cpu")


def _training_document(tmp_path, tokenizer, model_config, record, max_frames):
    """(ids, labels, pixels) of `record` as a training worker materialises it: a JSONL dataset
    and a YAML recipe read by the loader's RecordEvaluator (the planner's fit, then materialize)."""
    from megatron_vita.data.image import normalize_uint8
    from megatron_vita.data.loader import RecordEvaluator
    from megatron_vita.data.recipe import load_recipe

    root = os.path.commonpath([str(tmp_path)] + record["images"] + record["videos"])
    data = tmp_path / "records.jsonl"
    data.write_text(json.dumps(record) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: t\nstage: 2\nseq_length: 4096\nimage: {{max_tiles: 12}}\n"
                      f"video: {{max_frames: {max_frames}, max_fps: 1.0}}\n"
                      f"datasets:\n  - {{group: g, path: {data}, ratio: 1.0}}\n")
    ev = RecordEvaluator(load_recipe(str(recipe), root), tokenizer, model_config, root, str(tmp_path / "cache"))
    (ref, outcome, _, _) = ev.evaluate(0, 0)
    assert outcome == "ok"
    ids, labels, tiles = ev.materialize(ref)
    return ids, labels, normalize_uint8(tiles)


def test_prompt_is_the_training_layout(generator, png_path, mp4_path, tmp_path):
    """The prompt of a request is the training document of the same record (with the default
    system turn and an answer) cut before the answer: ids and pixels identical."""
    from megatron_vita.inference.prompt import DEFAULT_SYSTEM, build_prompt

    tok, mc = generator.tokenizer, generator.model_config
    request = single_turn(QUESTION, images=[png_path], videos=[mp4_path], max_num_frame=2)
    ids, pixels = build_prompt(request, tok, mc)
    record = {"messages": [{"role": "system", "content": DEFAULT_SYSTEM},
                           {"role": "user", "content": f"<video><image>\n{QUESTION}"},
                           {"role": "assistant", "content": "a yellow square"}],
              "images": [png_path], "videos": [mp4_path]}
    train_ids, labels, train_pixels = _training_document(tmp_path, tok, mc, record, max_frames=2)
    assert ids == train_ids[:len(ids)]
    # What follows the prompt in training is exactly the supervised answer.
    answer = tok("a yellow square", add_special_tokens=False)["input_ids"]
    assert train_ids[len(ids):len(ids) + len(answer)] == answer
    assert labels[len(ids) - 1] == answer[0] and all(x == -100 for x in labels[:len(ids) - 1])
    # 2 frames (12 frames at 4 fps, <= 1 fps, <= 2 frames), then the 150x90 PNG: thumbnail + a 3x2
    # grid (aspect 1.67: 3:2 is the closest of the grids of <= 12 tiles).
    assert pixels.shape == (2 + 1 + 6, 3, 56, 56)
    assert torch.equal(pixels, train_pixels)
    text = tok.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n<vid>")
    assert text.endswith(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    # A request's own system turn replaces the default one.
    own = GenerationRequest([Turn("system", "Be brief."), Turn("user", "Hello")])
    assert tok.decode(build_prompt(own, tok, mc)[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_prompt_over_max_seq_len_gets_fewer_frames_or_one_line(generator, mp4_path):
    from megatron_vita.inference.prompt import build_prompt

    tok, mc = generator.tokenizer, generator.model_config
    full_ids, full_pixels = build_prompt(single_turn(QUESTION, videos=[mp4_path]), tok, mc)
    assert full_pixels.shape[0] == 3
    per_frame = mc.num_image_token + 2
    # One token short of room for the answer: training's fewer_frames policy drops one frame.
    ids, pixels = build_prompt(single_turn(QUESTION, videos=[mp4_path], max_seq_len=len(full_ids)), tok, mc)
    assert pixels.shape[0] == 2 and len(ids) == len(full_ids) - per_frame
    assert torch.equal(pixels, build_prompt(single_turn(QUESTION, videos=[mp4_path], max_num_frame=2), tok, mc)[1])
    # Not even one frame fits: one line saying by how much.
    too_short = len(full_ids) - 2 * per_frame
    with pytest.raises(ValueError) as e:
        build_prompt(single_turn(QUESTION, videos=[mp4_path], max_seq_len=too_short), tok, mc)
    assert str(e.value).startswith(f"the prompt is {len(full_ids)} tokens ({len(full_ids) - 2 * per_frame} with one "
                                   f"frame per video); --max_seq_len {too_short}") and "\n" not in str(e.value)
    # Text alone has nothing to thin.
    with pytest.raises(ValueError, match="^the prompt is .* --max_seq_len 8 "):
        build_prompt(single_turn(QUESTION, max_seq_len=8), tok, mc)


def _argmax_loop(generator, ids, pixels, max_new):
    """Reference: full forwards without a KV cache, images at every step, argmax, stop tokens."""
    from megatron_vita.models.common.visual_tokens import context_token_indices

    model, mc = generator.model, generator.model_config
    seq = torch.tensor([ids])
    images = pixels if pixels.shape[0] else None
    indices = context_token_indices(seq, mc.tokens.context_ids, mc.num_image_token) if images is not None else None
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=seq, images=images, image_indices=indices, use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
            if nxt in (mc.tokens.eos_token_id, mc.tokens.bos_token_id):
                break
    return out


def test_greedy_equals_argmax_loop_without_cache(generator, png_path, mp4_path):
    from megatron_vita.inference.prompt import build_prompt

    for request in (single_turn(QUESTION, images=[png_path], videos=[mp4_path], max_num_frame=2,
                                sampling=SamplingParams(max_new_tokens=8)),
                    single_turn("Hello, how are you today?", sampling=SamplingParams(max_new_tokens=8))):
        result = generator.generate(request)
        ids, pixels = build_prompt(request, generator.tokenizer, generator.model_config)
        assert result.token_ids == _argmax_loop(generator, ids, pixels, 8)
        assert result.prompt_tokens == len(ids) and len(result.token_ids) >= 1
        assert result.finish_reason == ("stop" if len(result.token_ids) < 8 else "length")
        assert result.text == generator.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    # --max_seq_len caps the answer: prompt + answer <= max_seq_len.
    capped = single_turn("Hello, how are you today?", max_seq_len=result.prompt_tokens + 3,
                         sampling=SamplingParams(max_new_tokens=8))
    assert generator.generate(capped).token_ids == result.token_ids[:3]


def test_checkpoint_generation_config_does_not_leak(generator, tiny_model_dir, tmp_path):
    """A checkpoint whose generation_config penalises every repeated token and bans repeated
    unigrams still answers a greedy request with the plain argmax tokens (transformers fills the
    options a call leaves unset from the model's generation_config)."""
    from megatron_vita.inference.hf_generator import HFGenerator
    from megatron_vita.inference.prompt import build_prompt

    for name in os.listdir(tiny_model_dir):
        if name != "generation_config.json":
            os.symlink(os.path.join(tiny_model_dir, name), tmp_path / name)
    config = json.loads(open(os.path.join(tiny_model_dir, "generation_config.json")).read())
    config.update(repetition_penalty=100.0, no_repeat_ngram_size=1, min_new_tokens=8)
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    strict = HFGenerator(str(tmp_path), backend="cpu")
    request = single_turn("What colour is the shape? Hello, how are you today?",
                          sampling=SamplingParams(max_new_tokens=8))
    ids, pixels = build_prompt(request, generator.tokenizer, generator.model_config)
    reference = _argmax_loop(generator, ids, pixels, 8)
    assert strict.generate(request).token_ids == reference == generator.generate(request).token_ids
    # The reference itself repeats a prompt token, so the checkpoint's options would have changed it.
    assert set(reference) & set(ids)


def test_stream_joins_to_the_answer(generator, mp4_path):
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    for request in (single_turn("Describe the video.", videos=[mp4_path], sampling=SamplingParams(max_new_tokens=12)),
                    single_turn("Hello", sampling=sampled)):
        result = generator.generate(request)
        stream, pieces = generator.stream(request), []
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as done:
                streamed = done.value  # the exhausted stream returns generate()'s result
                break
        assert len(pieces) >= 2 and "".join(pieces) == result.text
        assert streamed == result, (streamed, result)
    # A seed makes sampling repeatable; another seed samples something else.
    again = generator.generate(single_turn("Hello", sampling=sampled))
    other = generator.generate(single_turn("Hello", sampling=SamplingParams(**{**vars(sampled), "seed": 8})))
    assert again.token_ids == result.token_ids != other.token_ids
    # A consumer that stops early frees the generator (the worker thread ends, the lock is released).
    stream = generator.stream(single_turn("Hello", sampling=SamplingParams(max_new_tokens=200)))
    next(stream)
    stream.close()
    assert generator.generate(single_turn("Hello", sampling=SamplingParams(max_new_tokens=2))).token_ids


def test_detokenizer_holds_partial_characters(generator):
    """Byte-level tokens split multi-byte characters: no piece carries U+FFFD, pieces join to the text."""
    from megatron_vita.inference.text import IncrementalDetokenizer

    tok = generator.tokenizer
    text = "héllo wörld ✓ 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case exists in this vocabulary
    d = IncrementalDetokenizer(tok)
    pieces = [d.push([i]) for i in ids] + [d.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_history_file(tmp_path, png_path):
    from megatron_vita.config.parallel import ConfigError
    from megatron_vita.inference.prompt import load_history

    media = tmp_path / "media"
    media.mkdir()
    os.symlink(png_path, media / "pic.png")
    record = {"messages": [{"role": "user", "content": "<image>\nWhat colour is the shape?"},
                           {"role": "gpt", "content": "yellow"}], "images": ["media/pic.png"]}
    (tmp_path / "history.json").write_text(json.dumps(record))
    turns, images, videos = load_history(str(tmp_path / "history.json"))
    assert [(t.role, t.content) for t in turns] == [("user", "<image>\nWhat colour is the shape?"),
                                                    ("assistant", "yellow")]
    assert images == [str(media / "pic.png")] and videos == []
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "robot", "content": "x"}, {"role": "user"}]))
    with pytest.raises(ConfigError) as e:
        load_history(str(tmp_path / "bad.json"))
    assert len(e.value.problems) == 2 and all(p.startswith("--history ") for p in e.value.problems)


def _infer(*argv, timeout=120):
    env = {**os.environ, "MEGATRON_VITA_BACKEND": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "megatron_vita", "infer", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.mark.timeout(300)
def test_cli_answers_from_the_hf_path(generator, tiny_model_dir, png_path, mp4_path, tmp_path, capfd):
    """stdout is exactly the answer (and a newline), the same as HFGenerator's for the same request:
    a subprocess with an image, a video and a chat history, streamed; then text only, run in this
    process (the answer still reaches file descriptor 1 alone: capfd reads the descriptors)."""
    from megatron_vita.cli import main

    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello, how are you today?"}]
    (tmp_path / "chat.json").write_text(json.dumps(history))
    request = GenerationRequest([Turn("user", "Hello"), Turn("assistant", "Hello, how are you today?"),
                                 Turn("user", f"<video><image>\n{QUESTION}")], images=[png_path], videos=[mp4_path],
                                max_num_frame=2, sampling=SamplingParams(max_new_tokens=6))
    run = _infer("--model_path", tiny_model_dir, "--history", str(tmp_path / "chat.json"), "--image_path", png_path,
                 "--video_path", mp4_path, "--question", QUESTION, "--max_num_frame", "2", "--max_new_tokens", "6",
                 "--stream")
    assert run.returncode == 0, run.stderr
    assert run.stdout == generator.generate(request).text + "\n"
    assert "[infer] hf path" in run.stderr
    text = single_turn("Describe the video.", sampling=SamplingParams(max_new_tokens=10))
    capfd.readouterr()
    assert main(["infer", "--backend", "cpu", "--model_path", tiny_model_dir, "--question", "Describe the video.",
                 "--max_new_tokens", "10"]) == 0
    out = capfd.readouterr()
    assert out.out == generator.generate(text).text + "\n" and "prompt tokens" in out.err


@pytest.mark.timeout(300)
def test_cli_answers_from_a_megatron_checkpoint(generator, tiny_model_dir, png_path, tmp_path):
    """`infer --model_path` on a Megatron checkpoint (converted from the HF one at TP 2, torch_dist):
    the megatron-core engine over 2 spawned ranks, streamed, with chunked prefill through the image's
    tiles, prints the HF path's answer (the tokenizer named with --tokenizer: a conversion records none)."""
    from megatron_vita.checkpoint.convert import convert
    from megatron_vita.config import ParallelConfig

    megatron = str(tmp_path / "megatron")
    convert(tiny_model_dir, megatron, "hf", "megatron", layout=ParallelConfig(tensor_model_parallel_size=2),
            progress=False, log=lambda *a, **k: None, backend="cpu")
    request = single_turn(f"<image>\n{QUESTION}", images=[png_path], sampling=SamplingParams(max_new_tokens=6))
    run = _infer("--model_path", megatron, "--tokenizer", tiny_model_dir, "--tp", "2", "--prefill-chunk", "16",
                 "--image_path", png_path, "--question", QUESTION, "--max_new_tokens", "6", "--stream", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == generator.generate(request).text + "\n"
    assert f"[infer] megatron path: loading {megatron}" in run.stderr


def _refusals(argv, capsys):
    from megatron_vita.cli import main

    assert main(["infer", "--backend", "cpu"] + argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def test_cli_refuses_each_problem_in_one_line(tiny_model_dir, png_path, tmp_path, capsys):
    lines = _refusals(["--model_path", tiny_model_dir, "--question", "Compare <image> and <image>.",
                       "--image_path", png_path, str(tmp_path / "missing.png"), "--video_path", str(tmp_path / "v.mp4"),
                       "--max_new_tokens", "0", "--top_p", "1.5", "--max_fps", "0", "--tp", "2", "--use-fused-rmsnorm",
                       "--history", str(tmp_path / "none.json")], capsys)
    prefix = "megatron-vita infer: error: "
    assert all(line.startswith(prefix) for line in lines), lines
    assert sorted(line[len(prefix):] for line in lines) == sorted([
        f"--history {tmp_path / 'none.json'}: no such file",
        "--max_new_tokens must be >= 1, got 0",
        "--top_p must be in (0, 1], got 1.5",
        "--max_fps must be > 0, got 0.0",
        "0 <video> tags in the turns but 1 videos given",
        f"image {tmp_path / 'missing.png'}: no such file",
        f"video {tmp_path / 'v.mp4'}: no such file or frame directory",
        f"--tp applies to a Megatron checkpoint; {tiny_model_dir} is an HF directory (transformers runs it in this "
        "process; megatron-vita convert makes a Megatron one)",
        f"--use-fused-rmsnorm: kernel flags apply to the megatron-core path; {tiny_model_dir} is an HF directory "
        "(transformers runs it unpatched)",
    ])
    lines = _refusals(["--model_path", str(tmp_path), "--question", "Hi"], capsys)
    assert lines == [f"megatron-vita infer: error: --model_path {tmp_path}: neither a Hugging Face directory "
                     "(config.json) nor a Megatron checkpoint (latest_checkpointed_iteration.txt or iter_* "
                     "directories)"]


def test_megatron_checkpoint_takes_the_tokenizer_training_recorded(tmp_path, tiny_model_dir, capsys):
    """The args training stores with a checkpoint name the tokenizer: --tokenizer, else the
    recipe's under --data-root; one line when it is not there."""
    from megatron_vita.inference.cli import check, recorded_tokenizer

    def checkpoint(name, **args):
        root = tmp_path / name
        (root / "iter_0000005").mkdir(parents=True)
        (root / "latest_checkpointed_iteration.txt").write_text("5")
        torch.save({"args": argparse.Namespace(**args), "iteration": 5}, root / "iter_0000005" / "common.pt")
        return str(root)

    data_root = tmp_path / "data"
    (data_root / "tok").mkdir(parents=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstage: 2\nseq_length: 64\ntokenizer: tok\ndatasets:\n  - {group: g, path: a.jsonl}\n")
    assert recorded_tokenizer(checkpoint("a", tokenizer=tiny_model_dir)) == tiny_model_dir
    assert recorded_tokenizer(checkpoint("b", tokenizer=None, recipe=str(recipe), data_root=str(data_root))) == \
        str(data_root / "tok")
    gone = checkpoint("c", tokenizer=str(tmp_path / "gone"))
    lines = _refusals(["--model_path", gone, "--question", "Hi"], capsys)
    assert lines == [f"megatron-vita infer: error: --model_path {gone}: the tokenizer recorded at training time, "
                     f"{tmp_path / 'gone'}, is not a directory here (relative to where training ran?); pass "
                     "--tokenizer DIR"]
    args = _parser().parse_args(["--model_path", checkpoint("d", tokenizer=tiny_model_dir), "--question", "Hi",
                                 "--tp", "2"])
    args.backend = "cpu"
    kind, request, tokenizer = check(args)
    assert (kind, tokenizer) == ("megatron", tiny_model_dir) and request.turns[-1].content == "Hi"


def _parser():
    from megatron_vita.inference.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser
