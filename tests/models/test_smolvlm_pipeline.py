"""vlmfast.pipeline("image-text-to-text") and `vlmfast generate` end to end on a tiny
random-weight SmolVLM checkpoint with a real tokenizer, against SmolVLM.generate run directly
on the processor's inputs."""

import json

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

import vlmfast  # noqa: E402
from tests.models.chat_inputs import random_image as _image  # noqa: E402
from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from vlmfast.cli import main  # noqa: E402
from vlmfast.models.smolvlm import SmolVLM  # noqa: E402
from vlmfast.models.smolvlm.processor import SmolVLMProcessor  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("smolvlm_ckpt"))
    images = tmp_path_factory.mktemp("images")
    for name, (h, w, seed) in {"a.png": (50, 70, 1), "b.png": (31, 45, 2), "c.png": (32, 32, 3)}.items():
        _image(h, w, seed).save(images / name)
    return path, images


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return vlmfast.pipeline("image-text-to-text", model=checkpoint[0], max_new_tokens=NEW)


def _direct(path, samples, prompts):
    """Processor -> SmolVLM.generate -> new tokens decoded, by hand."""
    processor = SmolVLMProcessor.from_pretrained(path)
    model = SmolVLM.from_pretrained(path)
    conversations = [[{"role": "user", "content": [{"type": "image"}] * len(s) + [{"type": "text", "text": p}]}]
                     for s, p in zip(samples, prompts)]
    inputs = processor(processor.apply_chat_template(conversations, add_generation_prompt=True),
                       samples if any(samples) else None)
    out = model.generate(**inputs, max_new_tokens=NEW)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)], new


def test_pipeline_equals_generate_on_processor_inputs(checkpoint, pipe):
    path, folder = checkpoint
    samples = [[Image.open(folder / "a.png")], [Image.open(folder / "b.png"), Image.open(folder / "c.png")], []]
    prompts = ["What is in this image?", "Compare them.", "Say something."]
    expected, new_tokens = _direct(path, samples, prompts)
    assert new_tokens.shape == (3, NEW) and all(expected)  # random weights still write text
    assert pipe(samples, prompts) == expected
    # paths instead of images, a bare image instead of a one-image list
    assert pipe([folder / "a.png", [str(folder / "b.png"), folder / "c.png"], None], prompts) == expected
    # one at a time: each equals its own direct run
    one = vlmfast.pipeline("image-text-to-text", model=path, max_new_tokens=NEW, batch_size=1)
    assert one(samples[:2], prompts[:2]) == [_direct(path, [s], [p])[0][0] for s, p in zip(samples[:2], prompts[:2])]


def test_pipeline_takes_chat_messages(checkpoint, pipe):
    _, folder = checkpoint
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(folder / "a.png")},
                                                 {"type": "text", "text": "What is in this image?"}]}]
    expected = pipe([Image.open(folder / "a.png")], ["What is in this image?"])
    assert pipe(conversation) == expected
    assert pipe([conversation, conversation]) == expected * 2


def test_pipeline_bad_inputs(checkpoint, pipe):
    with pytest.raises(ValueError, match="task: expected one of"):
        vlmfast.pipeline("text-classification", model=checkpoint[0])
    with pytest.raises(ValueError, match="dtype: expected one of"):
        vlmfast.pipeline("image-text-to-text", model=checkpoint[0], dtype="int8")
    with pytest.raises(TypeError, match="prompts: expected a string or a list of strings"):
        pipe([None], [3])
    with pytest.raises(ValueError, match=r"images: expected one entry .* per prompt \(2\)"):
        pipe([None], ["a", "b"])
    with pytest.raises(TypeError, match=r"images\[0\]: expected a PIL image"):
        pipe([3.5], ["a"])
    with pytest.raises(ValueError, match=r"content\[0\]: an image item needs an 'image'"):
        pipe([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])


def test_cli_single_prompt(checkpoint, pipe, capsys):
    path, folder = checkpoint
    code = main(["generate", "--model", str(path), "--image", str(folder / "a.png"), "--prompt", "What is it?",
                 "--max-new-tokens", str(NEW)])
    assert code == 0
    assert capsys.readouterr().out == pipe([folder / "a.png"], ["What is it?"])[0] + "\n"


def test_cli_batch_is_resumable(checkpoint, pipe, tmp_path, capsys):
    path, folder = checkpoint
    requests = [{"id": "q1", "image": "a.png", "prompt": "What is it?"},
                {"id": 2, "images": ["b.png", "c.png"], "prompt": "Compare them."},
                {"id": "q3", "prompt": "No image."}]
    file, out = tmp_path / "requests.jsonl", tmp_path / "out" / "results.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in requests[:2]))
    argv = ["generate", "--model", str(path), "--requests", str(file), "--out", str(out), "--image-root", str(folder),
            "--max-new-tokens", str(NEW), "--batch-size", "2", "--quiet"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 2
    expected = pipe([[folder / "a.png"], [folder / "b.png", folder / "c.png"], None],
                    [r["prompt"] for r in requests])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"id": "q1", "output": expected[0]}, {"id": 2, "output": expected[1]}]

    # a third request and a last line cut short by a crash: only those two are generated
    file.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out.write_text(out.read_text().splitlines(keepends=True)[0] + '{"id": 2, "out')
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["skipped"], summary["generated"]) == (1, 2)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"id": r["id"], "output": e} for r, e in zip(requests, expected)]

    assert main(argv) == 0  # all done: nothing loaded, nothing written
    assert json.loads(capsys.readouterr().out)["generated"] == 0
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("lines, extra, match", [
    (['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}'], [], r"requests.jsonl:2: duplicate id 1"),
    (['{"id": 1}'], [], r"requests.jsonl:1: 'prompt' must be a string"),
    (['{"id": 1, "prompt": "a", "images": "x.png"}'], [], r"requests.jsonl:1: 'image' must be a path"),
    (["not json"], [], r"requests.jsonl:1: not valid JSON"),
    ([], ["--prompt", "x"], r"give exactly one"),
])
def test_cli_bad_requests(checkpoint, tmp_path, capsys, lines, extra, match):
    file = tmp_path / "requests.jsonl"
    file.write_text("\n".join(lines) + "\n")
    code = main(["generate", "--model", str(checkpoint[0]), "--requests", str(file), "--out",
                 str(tmp_path / "o.jsonl"), *extra])
    assert code == 2
    assert match and __import__("re").search(match, capsys.readouterr().err)
