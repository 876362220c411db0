"""Offline batches on the engine (vlmfast generate --requests): the same answers as the
image-text-to-text pipeline (static batches of SmolVLM.generate), bad requests reported alone."""

import pytest
import torch

pytest.importorskip("transformers")

import vlmfast  # noqa: E402
from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from tests.serving.server_helpers import random_image  # noqa: E402
from vlmfast.serving.batch import answer_requests  # noqa: E402


def test_engine_batch_answers_equal_the_pipeline(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = write_checkpoint(tmp_path / "ckpt")
        for name, (h, w, seed) in {"a.png": (50, 70, 1), "b.png": (31, 45, 2)}.items():
            random_image(h, w, seed).save(tmp_path / name)
        (tmp_path / "broken.png").write_bytes(b"not a png")
        requests = [{"id": i, "images": [tmp_path / n for n in names], "prompt": prompt}
                    for i, (names, prompt) in enumerate([(["a.png"], "What is this?"), ([], "Say hi."),
                                                          (["b.png", "a.png"], "Compare them."),
                                                          (["broken.png"], "And this?"), (["b.png"], "Colour?")])]
        pipe = vlmfast.pipeline("image-text-to-text", model=checkpoint, max_new_tokens=7, batch_size=2)
        answers = {}
        errors = {}
        for request, answer, error in answer_requests(pipe.model, pipe.processor, requests, max_new_tokens=7,
                                                      max_batch=2):
            (answers if error is None else errors)[request["id"]] = answer if error is None else error
        assert set(errors) == {3} and "broken.png" in errors[3]
        good = [r for r in requests if r["id"] != 3]
        expected = pipe([[str(p) for p in r["images"]] for r in good], [r["prompt"] for r in good])
        assert [answers[r["id"]] for r in good] == expected
    finally:
        torch.set_num_threads(threads)
