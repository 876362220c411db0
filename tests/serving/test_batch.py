"""Offline batches on the engine (vlmfast generate --requests): the same answers as the
image-text-to-text pipeline (static batches of the model's generate), for SmolVLM (chunked
prefill, per-tile encoder cache) and Qwen2-VL (any family with generate()'s protocol: one prefill
call, M-RoPE offsets carried per row); bad requests reported alone."""

import pytest
import torch

pytest.importorskip("transformers")

import vlmfast  # noqa: E402
from tests.serving.server_helpers import random_image  # noqa: E402
from vlmfast.serving.batch import answer_requests  # noqa: E402
from vlmfast.serving.prefill import GenericRunner, SmolVLMRunner  # noqa: E402


def _checkpoint(family, path):
    if family == "smolvlm":
        from tests.models.smolvlm_checkpoint import write_checkpoint
    else:
        from tests.models.qwen2vl.helpers import write_checkpoint
    return write_checkpoint(path)


@pytest.mark.parametrize("family, runner", [("smolvlm", SmolVLMRunner), ("qwen2vl", GenericRunner)])
def test_engine_batch_answers_equal_the_pipeline(family, runner, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = _checkpoint(family, tmp_path / "ckpt")
        for name, (h, w, seed) in {"a.png": (50, 70, 1), "b.png": (31, 45, 2)}.items():
            random_image(h, w, seed).save(tmp_path / name)
        (tmp_path / "broken.png").write_bytes(b"not a png")
        requests = [{"id": i, "images": [tmp_path / n for n in names], "prompt": prompt}
                    for i, (names, prompt) in enumerate([(["a.png"], "What is this?"), ([], "Say hi."),
                                                          (["b.png", "a.png"], "Compare them."),
                                                          (["broken.png"], "And this?"), (["b.png"], "Colour?")])]
        pipe = vlmfast.pipeline("image-text-to-text", model=checkpoint, max_new_tokens=7, batch_size=2)
        used = []
        monkeypatch.setattr(runner, "step", lambda self, *a, _step=runner.step: (used.append(1), _step(self, *a))[1])
        answers, errors = {}, {}
        for request, answer, error in answer_requests(pipe.model, pipe.processor, requests, max_new_tokens=7,
                                                      max_batch=2):
            if error is None:
                answers[request["id"]] = answer
            else:
                errors[request["id"]] = error
        assert used  # the family's runner did the prefills
        assert set(errors) == {3} and "broken.png" in errors[3]
        good = [r for r in requests if r["id"] != 3]
        expected = pipe([[str(p) for p in r["images"]] for r in good], [r["prompt"] for r in good])
        assert [answers[r["id"]] for r in good] == expected
    finally:
        torch.set_num_threads(threads)
