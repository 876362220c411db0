"""Offline batches on the engine: `vlmfast generate --requests` answers its JSONL through
continuous batching instead of static batches (a batch no longer waits for its longest answer).

    for request, answer, error in answer_requests(model, processor, requests, max_new_tokens=64):
        ...   # in completion order; error is a message when that request failed

Requests are prepared (images read, chat template, processor) only a little ahead of the engine,
so a file of any length runs in bounded memory. The answers are those of the pipeline
(vlmfast.pipeline("image-text-to-text")): greedy, the checkpoint's stop tokens, decoded without
special tokens and stripped; token for token those of the model's generate run alone.
"""

from __future__ import annotations

from collections.abc import Iterator


def _prepare(processor, request: dict):
    from vlmfast.processing import load_image

    images = [load_image(str(p)) for p in request["images"]]
    conversation = [{"role": "user", "content": [{"type": "image"} for _ in images]
                     + [{"type": "text", "text": request["prompt"]}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text, images if images else None)
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return inputs["input_ids"][0], vision


def answer_requests(model, processor, requests: list[dict], *, max_new_tokens: int, max_batch: int = 8,
                    kv_memory_bytes: int | None = None) -> Iterator[tuple[dict, str | None, str | None]]:
    """requests: [{"id", "images": [paths], "prompt"}]. Yields (request, answer, None) or
    (request, None, error) as each finishes (completion order). max_batch: rows decoding
    together; kv_memory_bytes: the KV pool (None: the engine's default, rows capped at the
    model's context); a prompt that does not fit gets an error."""
    from vlmfast.serving.engine import Engine
    from vlmfast.serving.request import Request, SamplingParams

    tokenizer = processor.tokenizer
    engine = Engine(model, max_batch=max_batch, kv_memory_bytes=kv_memory_bytes, max_queue=max_batch,
                    decode_text=lambda t: tokenizer.decode(t, skip_special_tokens=True))
    finished: list = []
    pending = iter(requests)
    by_id = {}
    exhausted = False
    while True:
        while not exhausted and len(engine.waiting) < max_batch:  # prepared just ahead of the engine
            request = next(pending, None)
            if request is None:
                exhausted = True
                break
            try:
                ids, vision = _prepare(processor, request)
                handle = engine.submit(Request(ids, vision, SamplingParams(max_tokens=max_new_tokens, temperature=0)),
                                       on_event=lambda e: e.finished and finished.append(e.request_id))
            except (ValueError, TypeError, OSError) as error:
                yield request, None, str(error)
                continue
            by_id[handle.request_id] = (request, handle)
        if not engine.has_work():
            break
        engine.step()
        while finished:
            request, handle = by_id.pop(finished.pop(0))
            if handle.finish_reason == "error":
                yield request, None, handle.error
            else:
                yield request, handle.text.text.strip(), None
