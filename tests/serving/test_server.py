"""`vlmfast serve` through the real openai client (and raw HTTP where a client would not send
such a request), on a free local port, with a tiny random-weight SmolVLM checkpoint and its
tokenizer: answers equal SmolVLM.generate run alone (float32), streamed and not, 32 at once;
every bad input answered with OpenAI's error JSON while the server goes on; a client leaving
mid-stream; the encoder cache; the API key; a full queue; SIGTERM."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

pytest.importorskip("transformers")
pytest.importorskip("openai")
pytest.importorskip("fastapi")

import openai  # noqa: E402

import vlmfast  # noqa: E402
from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from tests.serving.server_helpers import (  # noqa: E402
    RunningServer, data_uri, image_part, png_bytes, random_image, reference_answer,
)
from vlmfast.models.smolvlm import SmolVLM  # noqa: E402
from vlmfast.models.smolvlm.processor import SmolVLMProcessor  # noqa: E402
from vlmfast.serving import Engine  # noqa: E402
from vlmfast.serving.app import ServerConfig  # noqa: E402
from vlmfast.serving.media import MediaPolicy  # noqa: E402

KEY = "sk-vlmfast-test"
MAX_PIXELS = 200 * 200


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    outside = tmp_path_factory.mktemp("private")
    random_image(40, 60, 1).save(root / "cat.png")
    random_image(30, 30, 9).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    return root, outside


@pytest.fixture(scope="module")
def processor(checkpoint):
    return SmolVLMProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return SmolVLM.from_pretrained(checkpoint)


def _server(checkpoint, processor, media_root=None, *, max_batch=16, max_queue=256, chunk_tokens=16):
    model = SmolVLM.from_pretrained(checkpoint)
    tokenizer = processor.tokenizer
    engine = Engine(model, max_batch=max_batch, kv_memory_bytes=8 << 20, chunk_tokens=chunk_tokens,
                    max_queue=max_queue, decode_text=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    config = ServerConfig(model_name="tiny-smolvlm", api_key=KEY, max_images=3,
                          media=MediaPolicy(local_root=media_root, allowed_domains=("127.0.0.1",),
                                            max_bytes=64 << 10, max_pixels=MAX_PIXELS, timeout_s=5))
    return RunningServer(engine, processor, config)


@pytest.fixture(scope="module")
def server(checkpoint, processor, media):
    running = _server(checkpoint, processor, media[0])
    yield running
    running.stop()


def _ask(client, messages, **options):
    return client.chat.completions.create(model="tiny-smolvlm", messages=messages, **options)


def test_health_models_metrics_and_the_api_key(server):
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    for path in ("/v1/models", "/metrics"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-smolvlm"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    metrics = server.metrics()
    for name in ("vlmfast_queue_length", "vlmfast_running_requests", "vlmfast_tokens_per_second",
                 'vlmfast_time_to_first_token_seconds{quantile="0.99"}'):
        assert name in metrics


def test_plain_and_streamed_answers_equal_generate(server, reference, processor):
    image = random_image(50, 70, 3)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [image_part(data_uri(image)), {"type": "text", "text": "What is this?"}]}]
    expected, tokens = reference_answer(reference, processor, messages, [image], max_tokens=12)
    client = server.client()
    plain = _ask(client, messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == expected
    assert plain.usage.completion_tokens == len(tokens)
    assert plain.choices[0].finish_reason == ("length" if len(tokens) == 12 else "stop")
    chunks = list(_ask(client, messages, max_completion_tokens=12, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_32_concurrent_requests_equal_generate_alone(server, reference, processor, media):
    images = [random_image(40 + 7 * i, 30 + 11 * i, 10 + i) for i in range(4)]
    cat = random_image(40, 60, 1)  # media/cat.png, sent as a file:// URL
    jobs = []
    for i in range(32):
        parts, used = [], []
        for k in range(i % 3):
            if (i + k) % 5 == 0:
                parts.append(image_part((media[0] / "cat.png").as_uri()))
                used.append(cat)
            else:
                image = images[(i + k) % 4]  # repeated images: the encoder cache answers some
                parts.append(image_part(data_uri(image)))
                used.append(image)
        parts.append({"type": "text", "text": "Describe the image " * (1 + i % 4) + f"number {i}."})
        sampled = i % 4 == 3
        options = dict(max_tokens=2 + (i * 5) % 17, temperature=0.9 if sampled else 0, seed=100 + i,
                       top_p=0.8 if sampled else 1.0)
        jobs.append(([{"role": "user", "content": parts}], used, options))
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: _ask(client, job[0], **job[2]), jobs))
    for (messages, used, options), answer in zip(jobs, answers):
        text, tokens = reference_answer(reference, processor, messages, used, max_tokens=options["max_tokens"],
                                        temperature=options["temperature"], top_p=options["top_p"],
                                        seed=options["seed"])
        assert answer.choices[0].message.content == text, options
        assert answer.usage.completion_tokens == len(tokens)


def _post(server, body, *, raw=False):
    content = body if raw else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content,
                      headers={**server.headers(), "Content-Type": "application/json"}, timeout=30)


def _user(*parts):
    return {"model": "tiny-smolvlm", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 3}


TEXT = {"type": "text", "text": "hi"}


def _bomb_png() -> bytes:
    from PIL import Image

    return png_bytes(Image.new("L", (4000, 4000)))  # 16 M pixels in a few KiB


BAD = {
    "malformed JSON": (b'{"model": "tiny-smolvlm", "messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None),
    "unknown field": ({**_user(TEXT), "max_token": 3}, 400, "unknown_parameter"),
    "unknown part field": (_user({**TEXT, "color": "red"}), 400, None),
    "bad role": ({"model": "tiny-smolvlm", "messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    "n > 1": ({**_user(TEXT), "n": 2}, 400, "unsupported_parameter"),
    "bad temperature": ({**_user(TEXT), "temperature": -1}, 400, None),
    "wrong model": ({**_user(TEXT), "model": "gpt-4o"}, 404, "model_not_found"),
    "bad base64": (_user(image_part("data:image/png;base64,@@not-base64@@"), TEXT), 400, "invalid_image"),
    "not an image mime": (_user(image_part("data:text/plain;base64,aGk="), TEXT), 400, "invalid_image"),
    "corrupt image": (_user(image_part("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAA=="), TEXT), 400,
                      "invalid_image"),
    "decompression bomb": (_user(image_part("data:image/png;base64," + __import__("base64").b64encode(
        _bomb_png()).decode()), TEXT), 400, "invalid_image"),
    "oversized image": (_user(image_part("data:image/png;base64," + "A" * (100 << 10)), TEXT), 400, "invalid_image"),
    "too many images": (_user(*[image_part(data_uri(random_image(8, 8, 0)))] * 4, TEXT), 400, "too_many_images"),
    "prompt longer than the context": ({**_user({"type": "text", "text": "word " * 3000}), "max_tokens": 10}, 400,
                                       "context_length_exceeded"),
    "max_tokens beyond the context": ({**_user(TEXT), "max_tokens": 100000}, 400, "context_length_exceeded"),
    "unsupported scheme": (_user(image_part("ftp://example.com/a.png"), TEXT), 400, "invalid_image"),
    "host not allowed": (_user(image_part("http://example.com/a.png"), TEXT), 400, "invalid_image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server, case):
    body, status, code = BAD[case]
    response = _post(server, body, raw=isinstance(body, bytes))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    ok = _post(server, _user(TEXT))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_local_files_only_under_the_media_folder(server, media):
    root, outside = media
    inside = _post(server, _user(image_part((root / "cat.png").as_uri()), TEXT))
    assert inside.status_code == 200
    for url in ((outside / "secret.png").as_uri(), (root / ".." / outside.name / "secret.png").as_uri(),
                (root / "link.png").as_uri(), (root / "missing.png").as_uri()):
        response = _post(server, _user(image_part(url), TEXT))
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", url


class _ImageHost(BaseHTTPRequestHandler):
    image = png_bytes(random_image(20, 20, 4))

    def do_GET(self):  # noqa: N802 - http.server's name
        routes = {"/img.png": (200, self.image, None), "/big.png": (200, b"x" * (100 << 10), None),
                  "/to-private": (302, b"", f"http://127.0.0.1:{self.server.server_port}/img.png"),
                  "/to-elsewhere": (302, b"", "http://example.com/img.png"), "/missing": (404, b"", None)}
        status, body, location = routes.get(self.path, (404, b"", None))
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_images_from_allowed_hosts_with_limits(server):
    host = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{host.server_port}"
    try:
        assert _post(server, _user(image_part(f"{base}/img.png"), TEXT)).status_code == 200
        for path, words in (("/big.png", "larger"), ("/to-private", "private"), ("/to-elsewhere", "not in"),
                            ("/missing", "404")):
            response = _post(server, _user(image_part(base + path), TEXT))
            assert response.status_code == 400 and words in response.json()["error"]["message"], path
    finally:
        host.shutdown()


def test_client_leaving_mid_stream_frees_its_row(server):
    before = server.metrics()
    aborted = 'vlmfast_requests_total{finish_reason="abort"}'
    body = {**_user(TEXT), "max_tokens": 1000, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers()) as response:
        assert response.status_code == 200
        for count, line in enumerate(response.iter_lines()):
            if count >= 6:
                break
    after = server.wait_for(lambda m: m["vlmfast_running_requests"] == 0 and m.get(aborted, 0) > before.get(aborted, 0))
    generated = after["vlmfast_generated_tokens_total"] - before["vlmfast_generated_tokens_total"]
    assert generated < 1000


def test_repeated_image_is_not_encoded_again(server, reference, processor):
    calls = []
    hook = server.engine.model.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        image = random_image(64, 64, 77)  # never sent by another test
        messages = [{"role": "user", "content": [image_part(data_uri(image)), {"type": "text", "text": "Again?"}]}]
        client = server.client()
        first = _ask(client, messages, max_tokens=4, temperature=0)
        encoded = len(calls)
        hits = server.metrics()["vlmfast_encoder_cache_hits_total"]
        assert encoded > 0
        followup = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "And in one word?"}]
        prefix_hits = server.metrics()["vlmfast_prefix_cache_hits_total"]
        second = _ask(client, followup, max_tokens=4, temperature=0)
        # the second turn starts as the first: its keys / values through the image came from the
        # prefix cache, so the image was not even needed
        assert len(calls) == encoded
        assert server.metrics()["vlmfast_prefix_cache_hits_total"] - prefix_hits == 1
        text, _ = reference_answer(reference, processor, followup, [image], max_tokens=4)
        assert second.choices[0].message.content == text
        # other words before the image: no prefix through it, the features from the encoder cache
        other = [{"role": "user", "content": [{"type": "text", "text": "First this."}, image_part(data_uri(image)),
                                              {"type": "text", "text": "Again?"}]}]
        third = _ask(client, other, max_tokens=4, temperature=0)
        assert len(calls) == encoded
        assert server.metrics()["vlmfast_encoder_cache_hits_total"] - hits == encoded
        text, _ = reference_answer(reference, processor, other, [image], max_tokens=4)
        assert third.choices[0].message.content == text
    finally:
        hook.remove()


def test_full_queue_answers_429(checkpoint, processor):
    small = _server(checkpoint, processor, max_batch=1, max_queue=1)
    try:
        long = {**_user(TEXT), "max_tokens": 1000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{small.url}/v1/chat/completions", json=long, headers=small.headers()) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            small.wait_for(lambda m: m["vlmfast_running_requests"] == 1)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(_post, small, _user(TEXT))
                small.wait_for(lambda m: m["vlmfast_queue_length"] == 1)
                refused = _post(small, _user(TEXT))
                assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
                stream.close()  # the long one leaves: the queued request gets its row
                assert waiting.result(timeout=30).status_code == 200
    finally:
        small.stop()


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(checkpoint):
    env = {**os.environ, "PYTHONPATH": str(Path(vlmfast.__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmfast.cli", "serve", "--model", str(checkpoint), "--port", "0", "--max-batch", "2",
         "--kv-memory", "0.01", "--served-model-name", "tiny"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        assert "vlmfast serve:" in line, line
        url = line.split(" on ")[1].split()[0]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                "ignore_eos": True, "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events.append(next(lines))
            process.send_signal(signal.SIGTERM)
            events += list(lines)
        data = [e[len("data: "):] for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 100  # answered to the end
        try:
            late = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=5)
            assert late.status_code == 503
        except httpx.TransportError:
            pass  # the listening socket is closed: refused
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
