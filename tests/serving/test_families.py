"""`vlmfast serve` for every family vlmfast.pipeline serves (SmolVLM, Qwen2-VL, LLaVA, BLIP-2): the
family read from config.json, the model and processor loaded by command.build, and a chat request
with an image through the openai client answered as the model's generate alone answers the same
prompt (float32, greedy), a second question on the same image taking its prefix from the cache."""

import argparse

import pytest

pytest.importorskip("transformers")
pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.serving.server_helpers import RunningServer, data_uri, image_part, random_image, reference_answer  # noqa: E402
from vlmfast.serving.command import add_serve_arguments, build  # noqa: E402
from vlmfast.serving.text import AnswerText  # noqa: E402


def _answer_text_is_transformers_decode(engine, path):
    """An answer's text is transformers' decode of its tokens with skip_special_tokens, nothing
    stripped (as vLLM, SGLang and llama.cpp's server): an answer whose first token carries a space
    starts with that space (SmolVLM's template ends in "Assistant:", its answers in " ..."), and
    the streamed deltas add up to the same text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = tokenizer(" A red square.", add_special_tokens=False)["input_ids"]
    special = [t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None]
    tokens = special[:1] + tokens + special[:1]
    expected = tokenizer.decode(tokens, skip_special_tokens=True)
    assert expected == " A red square."  # the tiny checkpoints' byte-level tokenizers keep the space
    answer = AnswerText(engine.decode_text, [])
    streamed = ""
    for token in tokens:
        answer.add(token)
        streamed += answer.delta()
    streamed += answer.delta(final=True)
    assert answer.text == streamed == expected


def _write(family, path):
    if family == "smolvlm":
        from tests.models.smolvlm_checkpoint import write_checkpoint
    elif family == "qwen2vl":
        from tests.models.qwen2vl.helpers import write_checkpoint
    elif family == "llava":
        from tests.models.llava.checkpoint import write_checkpoint
    else:
        from tests.models.blip2.checkpoint import write_checkpoint
    return write_checkpoint(path)


@pytest.mark.parametrize("family, model_class", [("smolvlm", "SmolVLM"), ("qwen2vl", "Qwen2VL"), ("llava", "Llava"),
                                                 ("blip-2", "Blip2")])
def test_serve_answers_every_family(family, model_class, tmp_path):
    path = _write(family, tmp_path / family)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model", str(path), "--device", "cpu", "--max-batch", "2", "--kv-memory", "0.01"])
    engine, processor, config = build(args)
    assert type(engine.model).__name__ == model_class
    _answer_text_is_transformers_decode(engine, path)
    reference = type(engine.model).from_pretrained(path)
    image = random_image(40, 60, 3)
    engine.prefix_cache.min_tokens = 4  # the tiny BLIP-2's image and BOS are 5 tokens, under the default 16
    server = RunningServer(engine, processor, config)
    try:
        client = server.client()
        cached = []
        for question in ("What is in this image?", "And what colour is it?"):
            messages = [{"role": "user", "content": [image_part(data_uri(image)), {"type": "text", "text": question}]}]
            reply = client.chat.completions.create(model=config.model_name, messages=messages, max_tokens=6,
                                                   temperature=0)
            text, tokens = reference_answer(reference, processor, messages, [image], max_tokens=6)
            assert reply.usage.completion_tokens == len(tokens)
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            assert reply.choices[0].message.content == text
        assert engine.prefix_cache.hits == 1  # the second question reused the image's prefix
        image_tokens = engine.prefix_cache.reused_tokens
        assert cached == [0, image_tokens] and image_tokens >= 4
    finally:
        server.stop()
