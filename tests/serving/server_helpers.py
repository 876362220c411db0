"""An in-process `vlmfast serve` on a free local port for the tests, and what they share: images as
data URIs, the reference answer of SmolVLM.generate run alone on a chat request, metrics."""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import httpx
import numpy as np
import torch
from PIL import Image

from vlmfast.serving.app import create_app
from vlmfast.serving.command import bind, make_server


class RunningServer:
    def __init__(self, engine, processor, config):
        self.engine, self.config = engine, config
        engine.start()
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = make_server(create_app(engine, processor, config), sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.config.api_key or "none", max_retries=0, timeout=60)

    def metrics(self) -> dict:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers()).text
        values = {}
        for line in text.splitlines():
            match = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if match:
                values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
        return values

    def wait_for(self, condition, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if condition(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"metrics never met the condition: {values}")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop(drain=False)


def random_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def reference_answer(model, processor, messages, images, *, max_tokens, temperature=0.0, top_p=1.0, seed=None):
    """(text, tokens) of SmolVLM.generate run alone on the chat request's prompt."""
    conversation = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = [{"type": "image"} if p["type"] == "image_url" else {"type": "text", "text": p["text"]} for p in content]
        conversation.append({"role": message["role"], "content": parts})
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text, images if images else None)
    inputs.pop("attention_mask")
    options = {}
    if temperature > 0:
        options = dict(do_sample=True, temperature=temperature, top_p=top_p,
                       generator=torch.Generator().manual_seed(seed))
    out = model.generate(**inputs, max_new_tokens=max_tokens, **options)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return processor.decode(tokens, skip_special_tokens=True), tokens
