"""`vlmfast zeroshot` labels, templates, top-k and scores (issue 19, items 3 and 5): label files vs
label lists (a misspelt file is an error, not a class), JSON lists, templates without {} refused
like `eval zeroshot`, --top-k in range, probabilities as open_clip computes them (or cosines, on
request), and unreadable images as error rows in input order with the diagnostics on stderr."""

import json

import numpy as np
import pytest
import torch

from tests.cli.helpers import direct_embedding, shape_images, tiny_clip
from vlmfast.cli import main
from vlmfast.models import CLIP
from vlmfast.models.tokenizer import load_tokenizer
from vlmfast.models.zeroshot import zero_shot_classifier

LABELS = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    paths = shape_images(root / "images", 4)
    return tiny_clip(root / "model"), root / "images", paths


def _zeroshot(model, images, *extra):
    return main(["zeroshot", "--model", str(model), "--images", str(images), "--device", "cpu", *extra])


def _rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _expected(model_dir, paths, templates=("a photo of a {}.",)):
    model = CLIP.from_pretrained(model_dir)
    classifier = zero_shot_classifier(model, load_tokenizer(model_dir), LABELS, list(templates))
    cosine = torch.from_numpy(direct_embedding(model_dir, paths)) @ classifier.T
    return cosine, torch.softmax(cosine * model.logit_scale.detach().exp(), dim=-1)


def test_scores_are_open_clip_probabilities_or_cosines_on_request(setup, capsys):
    model, images, paths = setup
    assert _zeroshot(model, images, "--labels", ",".join(LABELS), "--top-k", "3") == 0
    rows = _rows(capsys)
    cosine, probability = _expected(model, paths)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, expected in zip(rows, probability):
        got = dict(zip(row["labels"], row["scores"]))
        np.testing.assert_allclose([got[name] for name in LABELS], expected.numpy(), atol=2e-5)
        assert sum(row["scores"]) == pytest.approx(1.0, abs=1e-4)
    assert _zeroshot(model, images, "--labels", ",".join(LABELS), "--top-k", "2", "--scores", "cosine") == 0
    for row, expected in zip(_rows(capsys), cosine):
        top = expected.topk(2)
        assert row["labels"] == [LABELS[i] for i in top.indices] and row["scores"] == pytest.approx(top.values.tolist(), abs=2e-5)


def test_help_says_what_the_scores_are(capsys):
    assert main(["zeroshot", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "softmax over the labels of exp(logit_scale) * cosine" in text


def test_label_files_json_lists_and_misspelt_names(setup, tmp_path, capsys):
    model, images, _ = setup
    names = tmp_path / "names.txt"
    names.write_text("\n".join(LABELS) + "\n")
    as_json = tmp_path / "names.json"
    as_json.write_text(json.dumps(LABELS))
    results = []
    for value in (",".join(LABELS), str(names), str(as_json), json.dumps(LABELS)):
        assert _zeroshot(model, images, "--labels", value) == 0
        results.append(_rows(capsys))
    assert all(r == results[0] for r in results) and all(r["labels"][0] in LABELS for r in results[0])
    for value, message in ((str(tmp_path / "nmaes.txt"), "no such file"),
                           ("labels", "at least two class names"),
                           ('["red circle", 3]', "a JSON list of strings"),
                           ("a,b,a", "more than once")):
        assert _zeroshot(model, images, "--labels", value) == 2
        err = capsys.readouterr().err
        assert "argument --labels: " in err and message in err, (value, err)


def test_top_k_and_templates_are_checked_before_any_work(setup, capsys):
    model, images, _ = setup
    for extra, message in ((["--top-k", "0"], "argument --top-k: expected a positive integer"),
                           (["--top-k", "4"], "argument --top-k: expected at most the 3 labels, got 4"),
                           (["--templates", "a photo"], "argument --templates: 'a photo': expected exactly one {}"),
                           (["--templates", "a {} and a {}"], "argument --templates: 'a {} and a {}'")):
        assert _zeroshot(model, images, "--labels", ",".join(LABELS), *extra) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == "", extra


def test_eval_zeroshot_refuses_the_same_template(setup, capsys):
    model, images, _ = setup
    assert main(["eval", "zeroshot", "--model", str(model), "--data", str(images), "--template", "a photo"]) == 2
    assert "argument --template: 'a photo': expected exactly one {}" in capsys.readouterr().err


def test_unreadable_images_are_error_rows_in_order(setup, tmp_path, capsys):
    model, _, paths = setup
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]}\nmissing.png\n{paths[1]}\n")
    assert _zeroshot(model, listing, "--labels", ",".join(LABELS)) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    missing = str(tmp_path / "missing.png")
    assert [r["path"] for r in rows] == [str(paths[0]), missing, str(paths[1])]
    assert rows[1] == {"path": missing, "error": "no such file"} and "labels" in rows[0]
    assert f"skipped {missing}: no such file" in captured.err and captured.err.count(missing) == 1
    listing.write_text("missing.png\n")
    assert _zeroshot(model, listing, "--labels", ",".join(LABELS)) == 1
    assert "no image could be classified" in capsys.readouterr().err



class _ClosedAfterOneLine:
    """stdout whose reader leaves after the first line (`| head -1`)."""

    def __init__(self, fileno):
        self.lines, self._fileno = [], fileno

    def write(self, text):
        if self.lines:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines.append(text)

    def flush(self):
        pass

    def fileno(self):
        return self._fileno


def test_a_reader_that_stops_early_gets_no_traceback(setup, tmp_path, monkeypatch, capsys):
    import sys

    model, images, _ = setup
    sink = open(tmp_path / "sink", "w")  # main points the closed stdout's descriptor at /dev/null
    stdout = _ClosedAfterOneLine(sink.fileno())
    monkeypatch.setattr(sys, "stdout", stdout)
    assert _zeroshot(model, images, "--labels", ",".join(LABELS), "--batch-size", "1") == 141
    sink.close()
    assert json.loads(stdout.lines[0])["path"] and capsys.readouterr().err == ""
