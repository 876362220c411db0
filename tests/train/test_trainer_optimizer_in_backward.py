"""TrainConfig(optimizer_in_backward=True): the Trainer steps AdamW inside the backward
(vlmfast.train.adamw_in_backward) with the same weights as the plain Trainer, resumes exactly,
and refuses the options that need every gradient before the update."""

import json

import pytest
import torch

from vlmfast.train import TrainConfig, Trainer
from vlmfast.train.adamw_in_backward import AdamWInBackward

from tests.train.test_trainer import batches, tiny


def test_same_weights_as_the_plain_trainer():
    common = dict(steps=4, lr=1e-2, warmup_steps=1, weight_decay=0.1)
    plain = Trainer(tiny(), TrainConfig(**common), batches)
    in_backward = Trainer(tiny(), TrainConfig(**common, optimizer_in_backward=True), batches)
    assert isinstance(in_backward.optimizer, AdamWInBackward)
    plain_losses, losses = plain.fit(), in_backward.fit()
    torch.testing.assert_close(losses, plain_losses, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), in_backward.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
        assert b.grad is None  # dropped in the backward
    # weight decay on the matrices only, as the plain trainer's parameter groups
    decays = {group["weight_decay"] for group in in_backward.optimizer.param_groups}
    assert decays == {0.0, 0.1}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = dict(steps=5, lr=1e-2, warmup_steps=2, checkpoint_every=2, optimizer_in_backward=True)

    def trainer(name):
        return Trainer(tiny(), TrainConfig(**common, checkpoint_dir=str(tmp_path / name),
                                           log_path=str(tmp_path / f"{name}.jsonl")), batches)

    straight = trainer("a")
    expected = straight.fit()
    trainer("b").fit(stop_at=3)  # "crash" after step 3: the last checkpoint is from step 2
    resumed = trainer("b")
    assert resumed.step == 2
    assert resumed.fit() == expected  # bit for bit
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    logged = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(5))
    assert [r["lr"] for r in logged] == [json.loads(x)["lr"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]


def test_refuses_what_needs_every_gradient_first():
    with pytest.raises(ValueError, match=r"max_grad_norm: expected None with optimizer_in_backward"):
        TrainConfig(steps=2, max_grad_norm=1.0, optimizer_in_backward=True)
    with pytest.raises(ValueError, match=r"grad_accum: expected 1 with optimizer_in_backward"):
        TrainConfig(steps=2, grad_accum=2, optimizer_in_backward=True)


# ----------------------------------------------------------------------------- finetune / CLI

def test_finetune_flag_gives_the_plain_runs_weights(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from tests.models.smolvlm_checkpoint import write_checkpoint
    from vlmfast.cli import main
    from vlmfast.data import write_instruction_examples
    from vlmfast.models import token_head
    from vlmfast.train.finetune import FinetuneConfig, finetune

    # both runs' loss through the fused op (the flag's optimizer takes the head in its slices; the
    # plain run would take few labelled rows through materialised logits, rounded otherwise)
    monkeypatch.setattr(token_head, "MATERIALISED_LOGITS", 0)

    checkpoint = write_checkpoint(tmp_path / "base", split=False, seed=1)
    data = write_instruction_examples(tmp_path / "examples", n=4, seed=0)
    options = dict(steps=2, lr=1e-3, batch_size=2, freeze_vision=True, max_length=120, threads=1)
    finetune(checkpoint, data, tmp_path / "plain", log=None, max_grad_norm=None, **options)
    args = ["finetune", "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "flag"),
            "--steps", "2", "--lr", "1e-3", "--batch-size", "2", "--freeze-vision", "--max-length", "120",
            "--threads", "1", "--optimizer-in-backward", "--quiet"]
    assert main(args) == 0
    plain, flag = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "flag" / "model.safetensors")
    assert set(plain) == set(flag)
    for name in plain:
        torch.testing.assert_close(flag[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"max_grad_norm: expected None with optimizer_in_backward"):
        FinetuneConfig(optimizer_in_backward=True)  # the default clipping
    with pytest.raises(ValueError, match=r"grad_accum: expected 1 with optimizer_in_backward"):
        FinetuneConfig(optimizer_in_backward=True, max_grad_norm=None, grad_accum=2)
