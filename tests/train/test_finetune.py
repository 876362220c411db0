"""`vlmfast finetune` on a tiny random-weight SmolVLM with a real tokenizer and the built-in
example set: the collated data path against transformers (loss and every gradient), training
lowers the loss (full and LoRA), frozen weights stay bit-identical, the saved checkpoint gives
transformers the trained model's logits, an interrupted run resumes bit for bit, and the CLI.

The model-level parity (SmolVLM.loss vs transformers on hand-built batches) is
tests/models/test_smolvlm.py::test_loss_and_gradients_match_transformers; here the batches come
from the JSONL through the collator (right padding, answer-only labels)."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tests.models.smolvlm_checkpoint import write_checkpoint  # noqa: E402
from vlmfast.cli import main  # noqa: E402
from vlmfast.data import InstructionCollator, read_instructions, write_instruction_examples  # noqa: E402
from vlmfast.models.checkpoint import native_to_hf  # noqa: E402
from vlmfast.models.smolvlm import SmolVLM, SmolVLMProcessor  # noqa: E402
from vlmfast.models.smolvlm.model import split_gate_up  # noqa: E402
from vlmfast.train.finetune import FinetuneConfig, finetune, instruction_loss, prepare_model  # noqa: E402

FAST = dict(batch_size=4, threads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Unsplit images (one 32-pixel tile each) keep the sequences short."""
    return write_checkpoint(tmp_path_factory.mktemp("base"), split=False, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_instruction_examples(tmp_path_factory.mktemp("examples"), n=12, seed=0)


@pytest.fixture(scope="module")
def collated(checkpoint, data):
    """Every example of the set in one batch (right-padded, answer-only labels)."""
    processor = SmolVLMProcessor.from_pretrained(checkpoint, padding_side="right")
    return InstructionCollator(processor)(read_instructions(data))


def _loss_args(batch):
    return (batch["input_ids"], batch["labels"], batch["attention_mask"], batch["pixel_values"],
            batch["pixel_attention_mask"])


def _mean_loss(model, batch) -> float:
    with torch.no_grad():
        return float(instruction_loss(model.eval(), *_loss_args(batch)))


def _hf_model(path):
    return transformers.SmolVLMForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- parity

def test_collated_batch_loss_and_every_gradient_match_transformers(checkpoint, collated):
    batch = {k: v[:5] for k, v in collated.items()}
    hf = _hf_model(checkpoint)
    expected = hf(**batch).loss
    expected.backward()
    ours = SmolVLM.from_pretrained(checkpoint).train()
    actual = instruction_loss(ours, *_loss_args(batch))
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # our gradients under Hugging Face names (q/k/v and gate/up split as save_pretrained splits weights)
    grads = split_gate_up(native_to_hf({name: p.grad for name, p in ours.named_parameters()}))
    hf_params = dict(hf.named_parameters())
    assert set(grads) == set(hf_params)
    for name, param in hf_params.items():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- training

def test_full_fine_tune_lowers_the_loss_and_a_frozen_tower_stays_bit_identical(checkpoint, data, collated, tmp_path):
    before = _mean_loss(SmolVLM.from_pretrained(checkpoint), collated)
    report = finetune(checkpoint, data, tmp_path, log=None, steps=8, lr=3e-3, freeze_vision=True,
                      gradient_checkpointing=True, **FAST)
    after = _mean_loss(SmolVLM.from_pretrained(tmp_path), collated)
    assert after < before - 0.3, (before, after)
    assert report["steps"] == 8 and report["resumed_from"] == 0
    assert report["trainable_parameters"] < report["parameters"]
    base, tuned = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(base) == set(tuned)
    for name in base:
        if ".vision_model." in name:
            assert torch.equal(base[name], tuned[name]), name
        elif ".layers." in name and name.endswith("proj.weight"):
            assert not torch.equal(base[name], tuned[name]), name
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8


def test_lora_lowers_the_loss_and_changes_only_the_targeted_weights(checkpoint, data, collated, tmp_path):
    before = _mean_loss(SmolVLM.from_pretrained(checkpoint), collated)
    options = dict(steps=8, lr=3e-2, lora_rank=4, lora_targets=("q_proj", "v_proj", "down_proj"), freeze_vision=True,
                   bf16=True, **FAST)
    report = finetune(checkpoint, data, tmp_path, log=None, **options)
    tuned_model = SmolVLM.from_pretrained(tmp_path)
    assert _mean_loss(tuned_model, collated) < before - 0.1  # slower than full: the head and embeddings are frozen
    assert report["trainable_parameters"] < report["parameters"] // 10
    base, tuned = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    targeted = ("q_proj.weight", "v_proj.weight", "down_proj.weight")
    for name in base:  # merged adapters: only the decoder's targeted matrices moved (k between q and v did not)
        changed = not torch.equal(base[name], tuned[name])
        assert changed == (".text_model." in name and name.endswith(targeted)), name

    # the saved (merged) checkpoint gives transformers the logits of the trained, unmerged model
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)
    trained = prepare_model(checkpoint, FinetuneConfig(**options), torch.device("cpu")).eval()
    trained.load_state_dict(state["model"])
    inputs = {k: v[:4] for k, v in collated.items() if k != "labels"}
    with torch.no_grad():
        expected = trained(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"],
                           inputs["attention_mask"])
        from_hf = _hf_model(tmp_path)(**inputs).logits
        ours = tuned_model(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"],
                           inputs["attention_mask"])
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(from_hf[real], expected[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-4, atol=1e-5)


def test_lora_on_a_bfloat16_base_trains_float32_adapters_and_keeps_the_rest(checkpoint, data, collated, tmp_path):
    options = dict(steps=8, lr=3e-2, lora_rank=4, lora_targets="q_proj,v_proj,down_proj", bf16=True,
                   base_dtype="bfloat16", freeze_vision=True, **FAST)
    model = prepare_model(checkpoint, FinetuneConfig(**options), torch.device("cpu"))
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    before = _mean_loss(SmolVLM.from_pretrained(checkpoint), collated)
    finetune(checkpoint, data, tmp_path, log=None, **options)
    assert _mean_loss(SmolVLM.from_pretrained(tmp_path).float(), collated) < before - 0.1
    base, tuned = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for name in base:
        assert tuned[name].dtype == torch.bfloat16
        changed = not torch.equal(base[name].to(torch.bfloat16), tuned[name])
        assert changed == (".text_model." in name and name.endswith(("q_proj.weight", "v_proj.weight",
                                                                    "down_proj.weight"))), name


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights_bit_for_bit(checkpoint, data, tmp_path):
    options = dict(steps=5, lr=5e-3, grad_accum=2, checkpoint_every=2, lora_rank=2, lora_dropout=0.2,
                   warmup_steps=1, batch_size=3, threads=1)
    finetune(checkpoint, data, tmp_path / "straight", log=None, **options)

    def crash_after_step_3(message):  # step 3 is done, its checkpoint is not written (every 2)
        if message.startswith("step 3/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(checkpoint, data, tmp_path / "resumed", log=crash_after_step_3, **options)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    report = finetune(checkpoint, data, tmp_path / "resumed", log=None, **options)
    assert report["resumed_from"] == 2
    straight, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 5
    with pytest.raises(ValueError, match=r"holds a run started with other options \(lr: 0.005 -> 0.001\)"):
        finetune(checkpoint, data, tmp_path / "resumed", log=None, **{**options, "lr": 1e-3})


# ----------------------------------------------------------------------------- CLI

def test_cli_end_to_end_then_rerun_resumes(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["finetune", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--lr", "1e-3", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj",
            "--freeze-vision", "--bf16", "--gradient-checkpointing", "--max-length", "120", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr()  # progress on stderr, the report on stdout
    assert "step 1/2  loss" in printed.err and "step 2/2  loss" in printed.err and f"saved to {out}" in printed.err
    assert json.loads(printed.out)["steps"] == 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "preprocessor_config.json", "metrics.jsonl", "report.json", "checkpoint/trainer_state.pt"):
        assert (out / name).is_file(), name
    assert main(args + ["--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resumed_from"] == 2 and report["steps"] == 2
    SmolVLM.from_pretrained(out)
    SmolVLMProcessor.from_pretrained(out)


def test_cli_reports_bad_data_with_file_and_line(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": ["gone.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."}]}) + "\n")
    code = main(["finetune", "--model", str(checkpoint), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"{bad}:1: images[0]: no such file" in capsys.readouterr().err
