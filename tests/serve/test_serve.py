"""`megatron-vita serve` driven by the official `openai` client over loopback, on the tiny HF model.

Every answer is compared with HFGenerator.generate on the request `infer` builds for the same
question and media (api.single_turn), so server and CLI cannot drift; refusals are checked for
their status, OpenAI error shape and the limit they name, and the server must keep answering
after each one. The server's per-request media directory must be empty after every request.
"""
import base64
import json
import os
import threading
import time

import httpx
import openai
import pytest
from serve_testlib import start_server

from megatron_vita.inference.api import GenerationRequest, SamplingParams, Turn, single_turn

QUESTION = "What colour is the shape?"
MODEL = "tiny-long-vita"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(generator, media_root, serve_tmp):
    srv = start_server(generator, model_name=MODEL, media_root=media_root, max_request_bytes=1 << 20,
                       max_images=2, max_videos=1, max_frames=8, max_tokens=64, max_concurrency=32)
    yield srv
    srv.stop()


def reference(generator, question=QUESTION, tokens=6, **media):
    return generator.generate(single_turn(question, sampling=SamplingParams(max_new_tokens=tokens), **media))


def data_url(path, mime):
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def streamed(client, messages, **kwargs):
    """(joined content, last finish_reason) of a streamed answer."""
    text, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text_part(t=QUESTION):
    return {"type": "text", "text": t}


def assert_no_request_files(serve_tmp):
    # The worker releases a request's media right after its last event; allow it a moment.
    deadline = time.monotonic() + 5
    while os.listdir(serve_tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(serve_tmp) == []


def test_text_answers_equal_the_generators(server, generator, serve_tmp):
    ref = reference(generator)
    client = server.client()
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=6)
    assert answer.choices[0].message.content == ref.text
    assert answer.choices[0].finish_reason == ref.finish_reason
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
    assert answer.model == MODEL
    # The stream's finish reason is the answer's own (the Generator's stream returns its result).
    assert streamed(client, user(text_part()), max_tokens=6) == (ref.text, ref.finish_reason)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_image_and_video_parts(server, generator, media_root, serve_tmp):
    png, mp4 = os.path.join(media_root, "square.png"), os.path.join(media_root, "bar.mp4")
    client = server.client()
    image_ref = reference(generator, images=[png])
    video_ref = reference(generator, videos=[mp4])
    assert image_ref.text != video_ref.text  # the media reach the model
    as_data = client.chat.completions.create(
        model=MODEL, max_tokens=6,
        messages=user({"type": "image_url", "image_url": {"url": data_url(png, "image/png")}}, text_part()))
    assert as_data.choices[0].message.content == image_ref.text
    # A path under --media-root (relative to it), streamed.
    assert streamed(client, user({"type": "image_url", "image_url": {"url": "square.png"}}, text_part()),
                    max_tokens=6)[0] == image_ref.text
    assert streamed(client, user({"type": "video_url", "video_url": {"url": data_url(mp4, "video/mp4")}},
                                 text_part()), max_tokens=6)[0] == video_ref.text
    as_file = client.chat.completions.create(
        model=MODEL, max_tokens=6, messages=user({"type": "video_url", "video_url": {"url": f"file://{mp4}"}},
                                                 text_part()))
    assert as_file.choices[0].message.content == video_ref.text
    assert_no_request_files(serve_tmp)


def test_twenty_concurrent_clients(server, generator):
    questions = ["What colour is the shape?", "Describe the video.", "Hello, how are you today?",
                 "What is in the picture?"]
    refs = {q: reference(generator, q, tokens=1).text for q in questions}
    before = httpx.get(f"{server.url}/health").json()["completed"]
    answers, errors = {}, []

    def ask(i):
        try:
            client = server.client()
            q = questions[i % len(questions)]
            answers[i] = (q, client.chat.completions.create(
                model=MODEL, max_tokens=1, messages=[{"role": "user", "content": q}]).choices[0].message.content)
        except Exception as e:  # reported below with the others
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == []
    assert len(answers) == 20 and all(a == refs[q] for q, a in answers.values())
    health = httpx.get(f"{server.url}/health").json()
    assert health["completed"] - before == 20 and health["running"] == 0 and health["waiting"] == 0


BAD_REQUESTS = [
    # (name, request kwargs for the openai client, status, text the message must name)
    ("unknown model", dict(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}]), 404, "gpt-4o"),
    ("too many frames", dict(messages=user({"type": "video_url", "video_url": {"url": "bar.mp4"}}, text_part()),
                             extra_body={"max_num_frame": 9}), 400, "--max-frames 8"),
    ("too many tokens", dict(messages=user(text_part()), max_tokens=65), 400, "--max-tokens 64"),
    ("too many images", dict(messages=user(*[{"type": "image_url", "image_url": {"url": "square.png"}}] * 3,
                                           text_part())), 400, "--max-images 2"),
    ("path outside --media-root", dict(messages=user({"type": "image_url", "image_url": {"url": "../x/y.png"}},
                                                     text_part())), 403, "outside --media-root"),
    ("symlink out of --media-root", dict(messages=user({"type": "image_url", "image_url": {"url": "escape.png"}},
                                                       text_part())), 403, "outside --media-root"),
    ("undecodable image", dict(messages=user({"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()}}, text_part())),
     400, "undecodable image"),
    ("remote URL without the flag", dict(messages=user({"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:9/x.png"}}, text_part())), 403, "--allow-remote-media"),
    ("oversize body", dict(messages=user({"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * (3 << 19)}}, text_part())), 413, "--max-request-mb 1"),
]


@pytest.mark.parametrize("name,kwargs,status,names", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, generator, serve_tmp, name, kwargs,
                                                                status, names):
    client = server.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**{"model": MODEL, "max_tokens": 2, **kwargs})
    e = caught.value
    assert e.status_code == status, e.body
    assert names in e.body["message"] and e.body["type"] and e.body["code"], e.body
    ok = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": QUESTION}])
    assert ok.choices[0].message.content == reference(generator, tokens=2).text
    assert_no_request_files(serve_tmp)


def test_malformed_json_and_unknown_route(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.url}/v1/completions", json={})
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_original_put_api(server, generator, media_root, tmp_path):
    """The body Long-VITA's VLMEvalKit client sends, answered as its Flask server did."""
    png, mp4 = os.path.join(media_root, "square.png"), os.path.join(media_root, "bar.mp4")
    prompt = "<video><image>\n" + QUESTION
    payload = {"prompts": [prompt], "image_path_list": None, "video_path_list": [mp4],
               "image_list": [base64.b64encode(open(png, "rb").read()).decode()], "tokens_to_generate": 6,
               "max_num_frame": 4}
    r = httpx.put(f"{server.url}/api", content=json.dumps(payload), headers={"Content-Type": "application/json"},
                  timeout=60)
    ref = generator.generate(GenerationRequest([Turn("user", prompt)], images=[png], videos=[mp4],
                                               sampling=SamplingParams(max_new_tokens=6), max_num_frame=4))
    assert r.status_code == 200 and r.json() == {"text": [ref.text]}
    # Video-MME frame mode: images under <video> tags are one-frame videos.
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "00000.png").write_bytes(open(png, "rb").read())
    r = httpx.put(f"{server.url}/api", json={"prompts": ["<video>" + QUESTION], "image_path_list": [png],
                                             "tokens_to_generate": 6}, timeout=60)
    ref = generator.generate(GenerationRequest([Turn("user", "<video>" + QUESTION)], videos=[str(frames)],
                                               sampling=SamplingParams(max_new_tokens=6)))
    assert r.status_code == 200 and r.json() == {"text": [ref.text]}
    # Its errors carry `message`, which the client prints.
    r = httpx.put(f"{server.url}/api", json={"tokens_to_generate": 6})
    assert r.status_code == 400 and r.json()["message"] == "prompts argument required"
    r = httpx.put(f"{server.url}/api", json={"prompts": [QUESTION], "max_num_frame": 9})
    assert r.status_code == 400 and "--max-frames 8" in r.json()["message"]


def test_disconnecting_stream_frees_its_slot(generator, serve_tmp, media_root):
    """One slot: a client that leaves mid-stream cancels its generation between tokens, and the
    next client is served (not refused as busy)."""
    srv = start_server(generator, model_name=MODEL, media_root=media_root, max_tokens=1000, max_concurrency=1)
    try:
        body = {"model": MODEL, "stream": True, "max_tokens": 1000,
                "messages": user({"type": "image_url", "image_url": {"url": "square.png"}}, text_part())}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()  # not closed until the end: closing it drops the connection
                pieces = 0
                while pieces < 3:
                    line = next(lines)
                    pieces += line.startswith("data: ") and '"content"' in line
                # Its one slot is taken: the next request is refused, naming the limit.
                with pytest.raises(openai.RateLimitError) as busy:
                    srv.client().chat.completions.create(model=MODEL, max_tokens=2, messages=user(text_part()))
                assert "--max-concurrency 1" in busy.value.body["message"]
        deadline = time.monotonic() + 10
        while (h := httpx.get(f"{srv.url}/health").json())["running"] + h["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (h["running"], h["waiting"], h["cancelled"], h["completed"]) == (0, 0, 1, 0), h
        ok = srv.client().chat.completions.create(model=MODEL, max_tokens=2, messages=user(text_part()))
        assert ok.choices[0].message.content == reference(generator, tokens=2).text
        assert_no_request_files(serve_tmp)
    finally:
        srv.stop()


def test_a_non_streaming_client_that_leaves_stops_its_generation(generator, serve_tmp, media_root):
    """A client that gives up on a long non-streaming answer (its read times out, the connection
    closes) cancels the generation at the next piece: counted as cancelled, never completed, and
    the one slot serves the next client well before the 1000 tokens would have ended."""
    srv = start_server(generator, model_name=MODEL, media_root=media_root, max_tokens=1000, max_concurrency=1)
    try:
        body = {"model": MODEL, "max_tokens": 1000, "messages": user(text_part())}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        left = time.monotonic()
        while (h := httpx.get(f"{srv.url}/health").json())["running"] + h["waiting"] and time.monotonic() < left + 10:
            time.sleep(0.05)
        assert (h["running"], h["waiting"], h["cancelled"], h["completed"]) == (0, 0, 1, 0), h
        ok = srv.client().chat.completions.create(model=MODEL, max_tokens=2, messages=user(text_part()))
        assert ok.choices[0].message.content == reference(generator, tokens=2).text
        assert_no_request_files(serve_tmp)
    finally:
        srv.stop()


def test_remote_media_only_with_the_flag(generator, media_root, serve_tmp):
    """--allow-remote-media fetches http(s) media (here from a loopback file server), capped by
    --max-request-mb like a body."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=media_root))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}"
    srv = start_server(generator, model_name=MODEL, allow_remote_media=True, max_request_bytes=2000)
    try:
        client = srv.client()
        answer = client.chat.completions.create(
            model=MODEL, max_tokens=6, messages=user({"type": "image_url", "image_url": {"url": f"{url}/square.png"}},
                                                     text_part()))
        png = os.path.join(media_root, "square.png")
        assert answer.choices[0].message.content == reference(generator, images=[png]).text
        assert os.path.getsize(os.path.join(media_root, "bar.mp4")) > 2000
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model=MODEL, max_tokens=2, messages=user({"type": "video_url", "video_url": {"url": f"{url}/bar.mp4"}},
                                                         text_part()))
        assert caught.value.status_code == 413 and "--max-request-mb" in caught.value.body["message"]
        # Local paths stay refused without --media-root.
        with pytest.raises(openai.PermissionDeniedError, match="--media-root"):
            client.chat.completions.create(
                model=MODEL, max_tokens=2, messages=user({"type": "image_url", "image_url": {"url": png}}, text_part()))
        assert_no_request_files(serve_tmp)
    finally:
        srv.stop()
        files.shutdown()


def test_a_prompt_the_generator_refuses_is_a_4xx_streamed_or_not(generator):
    """A prompt longer than --max-seq-len allows is refused by the prompt builder: 400 with its
    reason before any chunk, for a stream too (not an error event after a 200)."""
    srv = start_server(generator, model_name=MODEL, max_seq_len=8)
    try:
        client = srv.client()
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="--max_seq_len 8"):
                answer = client.chat.completions.create(model=MODEL, max_tokens=2, messages=user(text_part()),
                                                        stream=stream)
                list(answer) if stream else None
        assert httpx.get(f"{srv.url}/health").json()["failed"] == 2
    finally:
        srv.stop()
