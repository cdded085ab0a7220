"""`blip2 serve` through the official openai client and plain HTTP: answers equal the library's,
token for token, alone or among 63 others; bad requests get OpenAI's error body and the server stays up."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import blip2  # noqa: E402
from blip2.apps.server import ServerSettings, build_app  # noqa: E402
from blip2.inputs.urls import UrlPolicy  # noqa: E402
from blip2.quant import cpu_kernels  # noqa: E402
from checkpoints import full_checkpoint, legacy_copy  # noqa: E402

NAME = "tiny-blip2"


def png(seed: int, size=(40, 52)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(model, **settings):
    """The server's app on a loopback port, in a thread of this process; yields its base URL."""
    with running_app(model, **settings) as (base, _):
        yield base


@contextlib.contextmanager
def running_app(model, **settings):
    port = free_port()
    app = build_app(model, ServerSettings(model_name=NAME, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(20)


def client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def ask(c: openai.OpenAI, image: bytes, text: str | None, history=(), stream=False, **kw):
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    messages = [{"role": "user", "content": parts}, *history] if history else [{"role": "user", "content": parts}]
    extra = {k: kw.pop(k) for k in ("num_beams", "top_k", "min_tokens", "repetition_penalty", "length_penalty")
             if k in kw}
    r = c.chat.completions.create(model=NAME, messages=messages, stream=stream, extra_body=extra or None, **kw)
    if not stream:
        return [ch.message.content for ch in r.choices]
    texts: dict[int, str] = {}
    for chunk in r:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    return [texts[i] for i in sorted(texts)]


@pytest.fixture(scope="module", params=["opt", "t5", "opt-legacy", "opt-bfloat16", "t5-bfloat16"])
def served(request, ckpt_root):
    # bfloat16: on CPUs with AVX512-BF16 the pool's steps run blip2's own products and attention,
    # which compute each row alone, so answers among other requests are still the answers alone
    # (oneDNN's products, elsewhere, may sum a row in another order when it comes with others)
    if request.param.endswith("bfloat16") and cpu_kernels.pairs_library() is None:
        pytest.skip("bfloat16 batches answer as alone only on blip2's AVX-512 products")
    lm = request.param.split("-")[0]
    path, _ = full_checkpoint(ckpt_root / f"serve-{lm}", lm, seed=57)
    if request.param == "opt-legacy":
        path = legacy_copy(path, ckpt_root / "serve-legacy", "opt")
    model = blip2.load(path, dtype="bfloat16" if request.param.endswith("bfloat16") else None)
    with running(model) as base:
        yield model, base
    model.close()


# server request settings -> the same settings for Blip2.chat / caption
SETTINGS = [
    (dict(temperature=0, max_tokens=12), dict(num_beams=1, max_new_tokens=12)),
    (dict(num_beams=3, max_tokens=8), dict(num_beams=3, max_new_tokens=8)),
    (dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=10),
     dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0, seed=7, num_beams=1, max_new_tokens=10)),
    (dict(temperature=0, max_tokens=9, repetition_penalty=1.4, min_tokens=3),
     dict(num_beams=1, max_new_tokens=9, repetition_penalty=1.4, min_new_tokens=3)),
]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_answers_equal_the_library(served, setting):
    model, base = served
    ours, lib = SETTINGS[setting]
    c = client(base)
    image = png(1)
    question = "what is in the picture?"
    expected = model.chat(image, [{"role": "user", "content": question}], **lib)
    assert ask(c, image, question, **ours) == [expected]
    assert ask(c, image, question, stream=True, **ours) == [expected]
    # an image with no text is captioned
    caption = model.caption(image, **lib)
    assert ask(c, image, None, **ours) == [caption]
    assert ask(c, image, "", stream=True, **ours) == [caption]


def test_chat_turns_and_several_choices(served):
    model, base = served
    c = client(base)
    image = png(2)
    history = [{"role": "assistant", "content": "a cat"}, {"role": "user", "content": "what colour is it?"}]
    turns = [{"role": "user", "content": "what is it?"}, *history]
    expected = model.chat(image, turns, num_beams=1, max_new_tokens=7)
    assert ask(c, image, "what is it?", history=history, temperature=0, max_tokens=7) == [expected]
    samples = model.generate(image, "Question: what is it? Answer:", do_sample=True, seed=3, top_k=0, max_new_tokens=6,
                             num_return_sequences=3)[0]
    got = ask(c, image, "what is it?", n=3, seed=3, max_tokens=6)
    assert got == [s.text for s in samples]
    assert ask(c, image, "what is it?", n=3, seed=3, max_tokens=6, stream=True) == got


def test_usage_finish_reason_and_models(served):
    model, base = served
    c = client(base)
    r = c.chat.completions.create(model=NAME, max_tokens=5, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(3))}}, {"type": "text", "text": "hi"}]}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == NAME
    ids = model.generate(png(3), "Question: hi Answer:", max_new_tokens=5)[0]
    assert r.usage.completion_tokens == len(ids.token_ids)
    assert r.choices[0].finish_reason == ("stop" if ids.token_ids[-1] in model.config.eos_token_ids else "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > model.config.num_query_tokens
    stream = c.chat.completions.create(model=NAME, max_tokens=5, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(3))}}]}])
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert [m.id for m in c.models.list().data] == [NAME]


def test_batched_requests_answer_as_alone(served):
    """64 requests at once, mixed images, prompts and settings: each answer is the one it gets alone."""
    model, base = served
    c = client(base)
    settings = [dict(temperature=0, max_tokens=9), dict(num_beams=2, max_tokens=6),
                dict(temperature=1.0, seed=11, max_tokens=8, top_k=20), dict(n=2, seed=5, max_tokens=7, top_p=0.8),
                dict(temperature=0, max_tokens=14, repetition_penalty=1.3)]
    jobs = [(png(10 + i % 7, size=(30 + i % 5, 41)), ["", "what is it?", "how many?", "tell me more"][i % 4],
             settings[i % len(settings)], i % 3 == 0) for i in range(64)]
    alone = [ask(c, img, text or None, **s) for img, text, s, _ in jobs]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda j: ask(c, j[0], j[1] or None, stream=j[3], **j[2]), jobs))
    assert together == alone


def post(base: str, body, headers=None, raw: bytes | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), dict(e.headers)


def body(url: str | None = None, text="what is it?", **kw) -> dict:
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"model": NAME, "messages": [{"role": "user", "content": parts}], "max_tokens": 4, **kw}


@pytest.fixture(scope="module")
def opt_model(ckpt_root):
    path, _ = full_checkpoint(ckpt_root / "serve-bad", "opt", seed=58)
    model = blip2.load(path)
    yield model
    model.close()


def bomb() -> bytes:
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    # claim 100000 x 100000 pixels in the IHDR chunk (decoders refuse it before allocating)
    import struct
    import zlib
    data[16:24] = struct.pack(">II", 100000, 100000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_requests_get_their_errors_and_the_server_stays_up(opt_model, tmp_path):
    good_png = png(4)
    with running(opt_model, api_key="sekrit", max_body_bytes=2_000_000, max_image_bytes=500_000) as base:
        key = {"Authorization": "Bearer sekrit"}
        cases = [
            (body(data_url(good_png)), {}, 401, "authentication_error"),
            (body(data_url(good_png)), {"Authorization": "Bearer wrong"}, 401, "authentication_error"),
            (body(data_url(good_png[:len(good_png) // 2])), key, 400, "invalid_request_error"),
            (body(data_url(b"this is not an image at all")), key, 400, "invalid_request_error"),
            (body("data:image/png;base64,@@@notbase64"), key, 400, "invalid_request_error"),
            (body(data_url(bomb())), key, 400, "invalid_request_error"),
            (body("http://127.0.0.1:9/nothing.png"), key, 400, "invalid_request_error"),  # private address
            (body("http://10.255.255.1/x.png"), key, 400, "invalid_request_error"),
            (body("ftp://example.com/x.png"), key, 400, "invalid_request_error"),
            (body(f"file://{tmp_path}/x.png"), key, 400, "invalid_request_error"),
            (body(data_url(b"\0" * 600_000)), key, 413, "invalid_request_error"),
            (body(None), key, 400, "invalid_request_error"),  # no image
            ({**body(data_url(good_png)), "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(good_png)}},
                {"type": "image_url", "image_url": {"url": data_url(good_png)}}]}]}, key, 400, "invalid_request_error"),
            (body(data_url(good_png), model="gpt-4o"), key, 404, "not_found_error"),
            (body(data_url(good_png), max_tokens=0), key, 400, "invalid_request_error"),
            (body(data_url(good_png), max_tokens=10**6), key, 400, "invalid_request_error"),
            (body(data_url(good_png), temperature=-1), key, 400, "invalid_request_error"),
            (body(data_url(good_png), top_p=1.5), key, 400, "invalid_request_error"),
            (body(data_url(good_png), n=3, num_beams=2), key, 400, "invalid_request_error"),
            (body(data_url(good_png), frequency_penalty=0.5), key, 400, "invalid_request_error"),
            (body(data_url(good_png), tools=[{"type": "function"}]), key, 400, "invalid_request_error"),
            (body(data_url(good_png), text="word " * 5000), key, 400, "invalid_request_error"),
            ({**body(data_url(good_png)), "messages": []}, key, 400, "invalid_request_error"),
            ({**body(data_url(good_png)), "messages": [{"role": "wizard", "content": "hi"}]}, key, 400,
             "invalid_request_error"),
            ({**body(data_url(good_png)), "messages": [{"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": data_url(good_png)}}]}]}, key, 400, "invalid_request_error"),
            ([1, 2, 3], key, 400, "invalid_request_error"),
        ]
        for i, (request, headers, status, kind) in enumerate(cases):
            got, answer, _ = post(base, request, headers)
            assert (got, answer["error"]["type"]) == (status, kind), (i, answer)
            message = answer["error"]["message"]
            assert message and "\n" not in message and "Traceback" not in message, (i, message)
            assert set(answer["error"]) == {"message", "type", "param", "code"}
            ok, answer, _ = post(base, body(data_url(good_png)), key)  # the server still answers
            assert ok == 200 and answer["choices"][0]["message"]["content"] is not None
        assert post(base, None, key, raw=b"{not json")[0] == 400
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)  # refused from its header
        conn.putrequest("POST", "/v1/chat/completions")
        for name, value in {**key, "Content-Type": "application/json", "Content-Length": "2100000"}.items():
            conn.putheader(name, value)
        conn.endheaders(b"{")
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
        conn.close()
        with urllib.request.urlopen(f"{base}/health") as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{base}/metrics") as r:
            text = r.read().decode()
        assert 'blip2_request_errors_total{kind="invalid_api_key"} 2.0' in text
        assert "blip2_time_to_first_token_seconds_count" in text and "blip2_images_encoded" in text


def test_private_urls_and_local_files_when_allowed(opt_model, tmp_path):
    image = png(6)
    (tmp_path / "a.png").write_bytes(image)
    expected = opt_model.chat(image, [{"role": "user", "content": "what is it?"}], num_beams=1, max_new_tokens=4)
    handler = lambda *a: None  # noqa: E731
    import functools
    import http.server
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    files.RequestHandlerClass.log_message = handler
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/a.png"
        with running(opt_model, urls=UrlPolicy(allow_private=True, allowed_local_path=tmp_path)) as base:
            for source in (url, f"file://{tmp_path}/a.png"):
                status, answer, _ = post(base, body(source, temperature=0))
                assert status == 200 and answer["choices"][0]["message"]["content"] == expected
            status, answer, _ = post(base, body(f"file://{tmp_path}/../etc/passwd"))
            assert status == 400
    finally:
        files.shutdown()


@pytest.fixture(scope="module")
def t5_model(ckpt_root):
    path, _ = full_checkpoint(ckpt_root / "serve-long", "t5", seed=60)  # T5: answers of any length
    with blip2.load(path) as model:
        yield model


def test_full_queue_refuses_and_nothing_hangs(t5_model):
    """40 clients at once against 2 decoding rows and a queue of 3: every request is answered or
    refused with 429 and Retry-After, within bounded time."""
    with running(t5_model, max_rows=2, max_queue=3) as base:
        request = body(data_url(png(7)), temperature=0, max_tokens=300, min_tokens=300)
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(lambda _: post(base, request), range(40)))
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 3 and 429 in statuses
        assert all(h.get("retry-after") or h.get("Retry-After") for s, _, h in results if s == 429)
        answers = {a["choices"][0]["message"]["content"] for s, a, _ in results if s == 200}
        assert len(answers) == 1
        with urllib.request.urlopen(f"{base}/health") as r:
            health = json.loads(r.read())
        assert health["running"] == 0 and health["waiting"] == 0


def test_client_that_leaves_frees_its_rows(t5_model):
    with running_app(t5_model, max_rows=4) as (base, app):
        engine = app.state.engine
        stream = client(base).chat.completions.create(
            model=NAME, max_tokens=2000, extra_body={"min_tokens": 2000}, temperature=0, stream=True,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(8))}}]}])
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 20
        while engine.running:
            assert time.monotonic() < deadline, "the request kept decoding after its client left"
            time.sleep(0.01)
        assert engine.steps < 1500


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(opt_model, monkeypatch):
    with running_app(opt_model) as (base, app):
        engine = app.state.engine
        step = type(engine.pool).step
        calls = []

        def failing(self, tokens, live):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("out of memory (simulated)")
            return step(self, tokens, live)

        monkeypatch.setattr(type(engine.pool), "step", failing)
        status, answer, _ = post(base, body(data_url(png(12)), temperature=0, max_tokens=5, min_tokens=5))
        assert status == 500 and "out of memory (simulated)" in answer["error"]["message"]
        assert answer["error"]["type"] == "server_error"
        status, answer, _ = post(base, body(data_url(png(12)), temperature=0, max_tokens=5))
        expected = opt_model.chat(png(12), [{"role": "user", "content": "what is it?"}], num_beams=1, max_new_tokens=5)
        assert status == 200 and answer["choices"][0]["message"]["content"] == expected
        with urllib.request.urlopen(f"{base}/health") as r:
            assert r.status == 200


def test_sigterm_finishes_running_answers(ckpt_root):
    path, _ = full_checkpoint(ckpt_root / "serve-term", "t5", seed=59)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "blip2.apps.cli", "serve", "--model", str(path), "--port", str(port),
                             "--served-model-name", NAME], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        results = []
        worker = threading.Thread(target=lambda: results.append(post(base, body(data_url(png(9)), max_tokens=400,
                                                                                 min_tokens=400, temperature=0))))
        worker.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert results and results[0][0] == 200 and results[0][1]["usage"]["completion_tokens"] == 400
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_cli_without_server_packages_says_what_to_install(tmp_path):
    script = ("import sys; sys.modules['fastapi'] = None\n"
              "from blip2.apps.cli import main\n"
              f"sys.exit(main(['serve', '--model', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "pip install 'blip2[serve]'" in r.stderr


def test_page_is_served(opt_model):
    with running(opt_model) as base:
        with urllib.request.urlopen(f"{base}/") as r:
            assert r.status == 200 and "text/html" in r.headers["content-type"]
            assert "/v1/chat/completions" in r.read().decode()

