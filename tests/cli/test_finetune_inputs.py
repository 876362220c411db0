"""`vlmfast finetune` finds bad data before the first step and keeps its work on Ctrl-C (issue 19,
items 8 and 10): every bad example and every unreadable image reported together before the model
loads; Ctrl-C with --checkpoint-every 0 saves the finished steps and the rerun resumes to the
same weights bit for bit; a rerun with another base model or changed data is refused; a model that
fails to load leaves no --out folder."""

import importlib
import json
import os
import shutil
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from vlmfast import _atomic  # noqa: E402
from vlmfast.cli import main  # noqa: E402
from vlmfast.data import write_instruction_examples  # noqa: E402
from vlmfast.train.finetune import finetune  # noqa: E402

finetune_module = importlib.import_module("vlmfast.train.finetune")  # vlmfast.train.finetune is also the function

OPTIONS = dict(steps=3, lr=5e-3, batch_size=2, lora_rank=2, threads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("base"), split=False, seed=1)


@pytest.fixture()
def data(tmp_path):
    return write_instruction_examples(tmp_path / "examples", n=6, seed=0)


def _no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(finetune_module, "prepare_model", refuse)


def test_every_bad_example_is_reported_before_the_model_loads(checkpoint, data, tmp_path, monkeypatch, capsys):
    lines = data.read_text().splitlines()
    lines[1] = "{oops"
    record = json.loads(lines[4])
    record["messages"] = record["messages"][:1]  # no answer left
    lines[4] = json.dumps(record)
    data.write_text("\n".join(lines) + "\n")
    _no_model(monkeypatch)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(checkpoint), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 bad example(s)" in err and f"{data}:2: not valid JSON" in err
    assert f"{data}:5: messages: no assistant turn" in err
    assert not out.exists()


def test_every_unreadable_image_is_reported_before_the_model_loads(checkpoint, data, tmp_path, monkeypatch, capsys):
    images = data.parent / "images"
    (images / "00001.png").write_bytes((images / "00001.png").read_bytes()[:60])  # truncated
    (images / "00004.png").write_bytes(b"not an image")
    _no_model(monkeypatch)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(checkpoint), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 image(s) cannot be read" in err
    assert f"{data}:2: images[0]: {(images / '00001.png').resolve()}: " in err
    assert f"{data}:5: images[0]: {(images / '00004.png').resolve()}: not an image file Pillow can read" in err
    assert not out.exists()


class _Interrupt:
    """A log function that sends this process SIGINT (Ctrl-C) when it sees step `at`."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, message: str) -> None:
        if message.startswith(f"step {self.at}/"):
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_the_finished_steps_and_the_rerun_resumes_bit_for_bit(checkpoint, data, tmp_path):
    # Python's own handler, or SIG_IGN where the shell started the tests in the background
    handler_before = signal.getsignal(signal.SIGINT)
    finetune(checkpoint, data, tmp_path / "straight", log=None, **OPTIONS)
    with pytest.raises(KeyboardInterrupt):
        finetune(checkpoint, data, tmp_path / "resumed", log=_Interrupt(at=2), **OPTIONS)
    state_file = tmp_path / "resumed" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["step"] == 2 and not (tmp_path / "resumed" / "model.safetensors").exists()
    assert stat.S_IMODE(state_file.stat().st_mode) == _atomic.file_mode()  # the umask's, as every other file
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back
    report = finetune(checkpoint, data, tmp_path / "resumed", log=None, **OPTIONS)
    assert report["resumed_from"] == 2
    straight, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_rerun_with_another_model_or_changed_data_is_refused(checkpoint, data, tmp_path):
    out = tmp_path / "out"
    finetune(checkpoint, data, out, log=None, **{**OPTIONS, "steps": 1})
    other = write_checkpoint(tmp_path / "other", split=False, seed=2)
    with pytest.raises(ValueError, match=r"holds a run started with other options \(another base model"):
        finetune(other, data, out, log=None, **{**OPTIONS, "steps": 1})
    image = data.parent / "images" / "00003.png"
    shutil.copy(data.parent / "images" / "00002.png", image)
    with pytest.raises(ValueError, match=r"other data \(--data or its images\)"):
        finetune(checkpoint, data, out, log=None, **{**OPTIONS, "steps": 1})


def test_a_model_that_fails_to_load_leaves_no_out_folder(checkpoint, data, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 8)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(broken), "--data", str(data), "--out", str(out), "--steps", "1"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert not out.exists()
