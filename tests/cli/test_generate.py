"""`vlmfast generate --requests` with bad inputs (issue 19, item 8): a missing image costs only
its own request (an error line, the rest answered as the pipeline answers them), a rerun answers
it once fixed; --no-skip-bad-inputs reports every bad request before the model loads and writes
nothing; bad request lines are reported together; nothing answerable is exit status 1; a model
that fails to load leaves no --out file."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

import vlmfast  # noqa: E402
import vlmfast.pipelines  # noqa: E402
from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from vlmfast.cli import main  # noqa: E402

NEW = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("smolvlm"), split=False)
    images = tmp_path_factory.mktemp("images")
    for name, seed in (("a.png", 1), ("b.png", 2)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(images / name)
    return path, images


def _requests(tmp_path, requests) -> str:
    file = tmp_path / "requests.jsonl"
    file.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests))
    return str(file)


def _generate(checkpoint, requests_file, out, *extra):
    path, images = checkpoint
    return main(["generate", "--model", str(path), "--requests", requests_file, "--out", str(out), "--image-root",
                 str(images), "--max-new-tokens", str(NEW), "--batch-size", "2", *extra])


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def _no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(vlmfast.pipelines, "pipeline", refuse)


def test_a_missing_image_costs_only_its_request_and_a_rerun_answers_it(checkpoint, tmp_path, capsys):
    path, images = checkpoint
    requests = [{"id": "q1", "image": "a.png", "prompt": "What is it?"},
                {"id": "q2", "image": "gone.png", "prompt": "And this?"},
                {"id": "q3", "images": ["b.png", "a.png"], "prompt": "Compare."},
                {"id": "q4", "prompt": "No image."}]
    file, out = _requests(tmp_path, requests), tmp_path / "results.jsonl"
    assert _generate(checkpoint, file, out) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["generated"], summary["failed"]) == (3, 1)
    missing = images / "gone.png"
    assert f"request 'q2': images[0] {missing}: no such file" in captured.err
    pipe = vlmfast.pipeline("image-text-to-text", model=path, max_new_tokens=NEW)
    expected = pipe([[images / "a.png"], [images / "b.png", images / "a.png"], None],
                    ["What is it?", "Compare.", "No image."])
    lines = _lines(out)
    assert {"id": "q2", "error": f"images[0] {missing}: no such file"} in lines
    assert [line for line in lines if "output" in line] == [
        {"id": rid, "output": answer} for rid, answer in zip(("q1", "q3", "q4"), expected)]

    Image.open(images / "a.png").save(missing)
    try:
        assert _generate(checkpoint, file, out) == 0
        assert json.loads(capsys.readouterr().out)["generated"] == 1
        lines = _lines(out)
        assert sorted(line["id"] for line in lines) == ["q1", "q2", "q3", "q4"]  # each once, no error left
        assert all("output" in line for line in lines)
    finally:
        missing.unlink()


def test_no_skip_bad_inputs_reports_every_bad_request_before_the_model_loads(checkpoint, tmp_path, monkeypatch,
                                                                             capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    file = _requests(tmp_path, [{"id": 1, "image": "gone.png", "prompt": "?"},
                                {"id": 2, "image": "a.png", "prompt": "?"},
                                {"id": 3, "image": str(tmp_path / "broken.png"), "prompt": "?"}])
    _no_model(monkeypatch)
    out = tmp_path / "out" / "results.jsonl"
    assert _generate(checkpoint, file, out, "--no-skip-bad-inputs") == 2
    err = capsys.readouterr().err
    assert "2 request(s) have an image that cannot be read" in err
    assert "requests.jsonl:1: images[0]" in err and "requests.jsonl:3: images[0]" in err and "not an image" in err
    assert not out.parent.exists()


def test_nothing_answerable_is_a_failure_and_loads_no_model(checkpoint, tmp_path, monkeypatch, capsys):
    file = _requests(tmp_path, [{"id": 1, "image": "gone.png", "prompt": "?"}])
    _no_model(monkeypatch)
    out = tmp_path / "results.jsonl"
    assert _generate(checkpoint, file, out) == 1
    assert "none of the 1 requests could be answered" in capsys.readouterr().err
    assert [line["id"] for line in _lines(out)] == [1] and "error" in _lines(out)[0]


def test_bad_request_lines_are_reported_together(checkpoint, tmp_path, capsys):
    file = _requests(tmp_path, [{"id": 1}, {"id": 2, "prompt": "fine"}, "not json", {"id": 2, "prompt": "again"}])
    assert _generate(checkpoint, file, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert "3 bad request line(s)" in err
    assert "requests.jsonl:1: 'prompt' must be a string" in err and "requests.jsonl:3: not valid JSON" in err
    assert "requests.jsonl:4: duplicate id 2" in err


def test_a_model_that_fails_to_load_leaves_no_out_file(checkpoint, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("model.safetensors: not a readable safetensors file")
    monkeypatch.setattr(vlmfast.pipelines, "pipeline", broken)
    out = tmp_path / "new" / "results.jsonl"
    assert _generate(checkpoint, _requests(tmp_path, [{"id": 1, "image": "a.png", "prompt": "?"}]), out) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert not out.parent.exists()
