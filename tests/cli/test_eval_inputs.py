"""`vlmfast eval` checks every image before the first batch (issue 19, item 8): all unreadable
images reported together and the model never loaded; with --skip-bad-inputs the others are
evaluated and the failures listed in the report with the entry, the file and the reason."""

import json

import pytest

import vlmfast.pipelines
from tests.eval.test_runners import _write_vqa, fake_vqa
from vlmfast.cli import main
from vlmfast.eval import runners


def _break_two_images(tmp_path):
    qpath, apath = _write_vqa(tmp_path)
    (tmp_path / "val" / "COCO_val2014_000000000012.jpg").unlink()
    (tmp_path / "val" / "COCO_val2014_000000000014.jpg").write_bytes(b"truncated")
    return qpath, apath


def test_every_unreadable_image_is_reported_before_the_first_batch(tmp_path):
    qpath, apath = _break_two_images(tmp_path)
    calls = []
    with pytest.raises(ValueError) as raised:
        runners.run_vqa(lambda images, prompts: calls.append(1) or fake_vqa(images, prompts), qpath, apath,
                        tmp_path / "val", show_progress=False)
    message = str(raised.value)
    assert "2 of 4 entries have an image that cannot be read" in message
    assert "questions file questions[1]: image file not found" in message
    assert "questions file questions[3]: cannot read image" in message and "not an image file" in message
    assert calls == []  # nothing generated before the check


def test_skip_bad_inputs_evaluates_the_others_and_lists_the_failures(tmp_path):
    qpath, apath = _break_two_images(tmp_path)
    report = runners.run_vqa(fake_vqa, qpath, apath, tmp_path / "val", show_progress=False, skip_bad_inputs=True)
    assert report["num_questions"] == 2 and [p["question_id"] for p in report["predictions"]] == [1, 3]
    assert [(f["source"], f["reason"]) for f in report["failed"]] == [
        ("questions file questions[1]", "no such file"), ("questions file questions[3]", "not an image file Pillow can read")]


def test_the_command_checks_before_it_loads_the_model(tmp_path, monkeypatch, capsys):
    qpath, apath = _break_two_images(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "smolvlm"}))

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(vlmfast.pipelines, "pipeline", refuse)
    assert main(["eval", "vqa", "--model", str(model), "--questions", str(qpath), "--annotations", str(apath),
                 "--images", str(tmp_path / "val"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 entries have an image that cannot be read" in err and "Traceback" not in err
