"""`vlmfast eval vqa` and `vlmfast eval caption` end to end on a tiny random-weight SmolVLM
checkpoint: the predictions are the pipeline's, and the metrics are the runners' on those
predictions."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

import vlmfast  # noqa: E402
from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from vlmfast.cli import main  # noqa: E402
from vlmfast.eval import runners  # noqa: E402

NEW, BATCH = 4, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("smolvlm_eval"))
    folder = tmp_path_factory.mktemp("eval_images")
    sizes = {11: (50, 70), 12: (31, 45), 13: (32, 32), 14: (64, 20)}
    for image_id, (h, w) in sizes.items():
        pixels = np.random.default_rng(image_id).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{image_id}.png")
    pipe = vlmfast.pipeline("image-text-to-text", model=path, max_new_tokens=NEW, batch_size=BATCH)
    return path, folder, pipe


def _replay(predictions):
    """A generate callable answering with recorded predictions, in order."""
    answers = iter(predictions)
    return lambda images, prompts: [next(answers) for _ in prompts]


def test_eval_vqa(setup, tmp_path, capsys):
    path, folder, pipe = setup
    questions = {1: (11, "What is it?"), 2: (12, "What colour is this?"), 3: (13, "How many?"), 4: (14, "Is it?")}
    prompts = [f"Q: {q}" for _, q in questions.values()]
    predicted = pipe([Image.open(folder / f"{i}.png") for i, _ in questions.values()], prompts)
    # references: question 1 answered by all 10 annotators as predicted, question 2 by 2 of 10
    refs = {1: [predicted[0]] * 10, 2: [predicted[1]] * 2 + ["navy"] * 8, 3: ["3"] * 10, 4: ["no"] * 10}
    qfile, afile = tmp_path / "questions.json", tmp_path / "annotations.json"
    qfile.write_text(json.dumps({"questions": [{"question_id": k, "image_id": i, "question": q}
                                               for k, (i, q) in questions.items()]}))
    afile.write_text(json.dumps({"annotations": [{"question_id": k, "answer_type": "other",
                                                  "answers": [{"answer": a} for a in refs[k]]} for k in refs]}))
    report_file = tmp_path / "vqa.json"
    code = main(["eval", "vqa", "--model", str(path), "--questions", str(qfile), "--annotations", str(afile),
                 "--images", str(folder), "--image-file", "{image_id}.png", "--prompt", "Q: {question}",
                 "--max-new-tokens", str(NEW), "--batch-size", str(BATCH), "--report", str(report_file), "--quiet"])
    assert code == 0
    report = json.loads(report_file.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["predictions"] == [{"question_id": k, "answer": a} for k, a in zip(questions, predicted)]
    expected = runners.run_vqa(_replay(predicted), qfile, afile, folder, image_file="{image_id}.png",
                               prompt="Q: {question}", batch_size=BATCH, show_progress=False)
    assert report == expected
    # official accuracy: mean over the 10 leave-one-out sets of min(matches / 3, 1); 2 of 10 -> 0.6
    assert report["accuracy"] == pytest.approx((1 + (2 * 1 / 3 + 8 * 2 / 3) / 10) / 4)


def test_eval_caption(setup, tmp_path, capsys):
    path, folder, pipe = setup
    ids = [11, 12, 13]
    predicted = pipe([Image.open(folder / f"{i}.png") for i in ids], ["Describe."] * 3)
    refs = {11: [predicted[0], "a red square on a table"], 12: ["a green square", "green grass"],
            13: ["the sky is blue", predicted[2] + " in the sky"]}
    file = tmp_path / "captions.json"
    file.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png"} for i in ids],
                                "annotations": [{"image_id": i, "caption": c} for i in ids for c in refs[i]]}))
    report_file = tmp_path / "caption.json"
    code = main(["eval", "caption", "--model", str(path), "--annotations", str(file), "--images", str(folder),
                 "--split", "all", "--prompt", "Describe.", "--max-new-tokens", str(NEW), "--batch-size", str(BATCH),
                 "--report", str(report_file), "--quiet"])
    assert code == 0
    report = json.loads(report_file.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["predictions"] == [{"image_id": i, "caption": c} for i, c in zip(ids, predicted)]
    expected = runners.run_caption(_replay(predicted), file, folder, prompt="Describe.", split=None,
                                   batch_size=BATCH, show_progress=False)
    assert report == expected
    assert report["BLEU-1"] > 0 and report["CIDEr-D"] > 0


def test_eval_vqa_errors_are_reported(setup, tmp_path, capsys):
    path, folder, _ = setup
    code = main(["eval", "vqa", "--model", str(path), "--questions", str(tmp_path / "none.json"),
                 "--annotations", str(tmp_path / "none.json"), "--images", str(folder), "--quiet"])
    assert code == 2
    assert "none.json" in capsys.readouterr().err
    code = main(["eval", "caption", "--model", str(path), "--annotations", str(folder / "11.png"), "--images",
                 str(folder), "--max-new-tokens", "0"])
    assert code == 2
    assert "argument --max-new-tokens: expected a positive integer" in capsys.readouterr().err
