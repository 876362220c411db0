"""The OpenAI chat-completions request, checked field by field, and the error body.

Every problem is an ApiError carrying OpenAI's error shape:
    {"error": {"message": ..., "type": "invalid_request_error", "param": "messages[0].content", "code": ...}}
Unknown fields are refused (a misspelt "max_token" would otherwise be silently ignored).
"""

from __future__ import annotations

import dataclasses

ROLES = ("system", "user", "assistant")
# Accepted only at their neutral value: clients often send them.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
# top_k and ignore_eos: vLLM's extensions (the openai client sends them through extra_body)
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
         "seed", "stream", "stream_options", "user", "ignore_eos", *NEUTRAL}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    """model; conversation in the processor's chat format ({"role", "content": [{"type": "text",
    "text"} | {"type": "image"}]}); image_urls with the field each came from."""

    model: str
    conversation: list[dict]
    image_urls: list[tuple[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _number(payload: dict, name: str, low: float, high: float, default: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(name, f"expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def _int(payload: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise _bad(name, f"expected {bound}, got {value!r}")
    return value


def _content(content, where: str, images: list) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise _bad(where, "expected a string or a non-empty list of content parts")
    parts = []
    for k, part in enumerate(content):
        at = f"{where}[{k}]"
        if not isinstance(part, dict):
            raise _bad(at, "expected an object {type, ...}")
        kind = part.get("type")
        if kind == "text":
            extra = set(part) - {"type", "text"}
            if extra or not isinstance(part.get("text"), str):
                raise _bad(at, "expected {\"type\": \"text\", \"text\": string}"
                           + (f"; unknown field(s) {sorted(extra)}" if extra else ""))
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            extra = set(part) - {"type", "image_url"}
            if extra:
                raise _bad(at, f"unknown field(s) {sorted(extra)}")
            value = part.get("image_url")
            if isinstance(value, dict):
                unknown = set(value) - {"url", "detail"}
                if unknown:
                    raise _bad(f"{at}.image_url", f"unknown field(s) {sorted(unknown)}")
                value = value.get("url")
            if not isinstance(value, str) or not value:
                raise _bad(f"{at}.image_url", "expected {\"url\": string}")
            images.append((value, f"{at}.image_url"))
            parts.append({"type": "image"})
        else:
            raise _bad(f"{at}.type", f"expected 'text' or 'image_url', got {kind!r}")
    return parts


def parse_chat_request(payload) -> ChatRequest:
    """The JSON body -> ChatRequest, or ApiError(400)."""
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(payload) - KNOWN)
    if unknown:
        raise _bad(unknown[0], f"unrecognized request argument(s) {unknown}", "unknown_parameter")
    for name, neutral in NEUTRAL.items():
        if payload.get(name) is not None and payload[name] != neutral:
            raise _bad(name, f"only {neutral!r} is supported, got {payload[name]!r}", "unsupported_parameter")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "expected the model's name (GET /v1/models)")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    conversation, images = [], []
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict):
            raise _bad(where, "expected an object {role, content}")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise _bad(where, f"unknown field(s) {sorted(extra)}")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"expected one of {list(ROLES)}, got {role!r}")
        conversation.append({"role": role, "content": _content(message.get("content"), f"{where}.content", images)})
    if conversation[-1]["role"] == "assistant":
        raise _bad("messages", "the last message must be the user's (or system's): the answer is generated")

    max_tokens = _int(payload, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(payload, "max_tokens", 1)
    stop = payload.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "expected a non-empty string or a list of at most 4 of them")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"expected a bool, got {stream!r}")
    options = payload.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", "expected {\"include_usage\": bool}")
        include_usage = bool(options.get("include_usage"))
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "expected a string")
    ignore_eos = payload.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", f"expected a bool, got {ignore_eos!r}")
    top_k = _int(payload, "top_k", -1)
    if payload.get("top_p") is not None and payload["top_p"] == 0:
        raise _bad("top_p", "expected a number in (0, 1], got 0")
    return ChatRequest(
        model=model, conversation=conversation, image_urls=images, max_tokens=max_tokens,
        temperature=_number(payload, "temperature", 0.0, 2.0, 1.0), top_p=_number(payload, "top_p", 0.0, 1.0, 1.0),
        top_k=None if top_k in (None, -1, 0) else top_k, stop=stop, seed=_int(payload, "seed", 0, 2**63 - 1),
        stream=bool(stream), include_usage=include_usage, ignore_eos=bool(ignore_eos),
    )
