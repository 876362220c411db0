"""`vlmfast finetune` under torchrun (2 CPU processes, gloo): each rank collates its half of every
micro-batch, the loss is reweighted to the global batch's token mean, so the per-step losses and
the saved weights equal one process's with the whole batch; rank 0 alone writes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from vlmfast.data import write_instruction_examples  # noqa: E402
from vlmfast.train.finetune import finetune  # noqa: E402

OPTIONS = dict(steps=3, lr=3e-3, batch_size=4, grad_accum=2, lora_rank=2, freeze_vision=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this python")
    checkpoint = write_checkpoint(tmp_path / "base", split=False, seed=2)
    data = write_instruction_examples(tmp_path / "data", n=10, seed=1)
    args = ["--steps", "3", "--lr", "3e-3", "--batch-size", "4", "--grad-accum", "2", "--lora-rank", "2",
            "--freeze-vision", "--threads", "1", "--quiet"]
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "vlmfast.cli", "finetune",
           "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "ddp"), *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone printed its report
    assert report["world_size"] == 2 and report["steps"] == 3

    single = finetune(checkpoint, data, tmp_path / "single", log=None, threads=1, **OPTIONS)
    assert single["world_size"] == 1
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "ddp")), torch.tensor(_losses(tmp_path / "single")),
                               rtol=1e-5, atol=1e-6)
    ddp, whole = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert ddp.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(ddp[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)
    base = load_file(checkpoint / "model.safetensors")
    assert any(not torch.equal(base[k], ddp[k]) for k in base)  # it trained
