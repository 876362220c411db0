"""LLaVA's two stages and BLIP-2's Q-Former stage (vlmfast.train.recipes) on tiny checkpoints, with
the instruction collators (answers and their EOS labelled): what learns, that the loss falls, what
stays frozen, and that a stage-2 model with its LoRA merged saves a checkpoint transformers reads
with the same logits."""

import pytest
import torch

from tests.models.blip2.checkpoint import write_checkpoint as write_blip2
from tests.models.llava.checkpoint import write_checkpoint as write_llava
from vlmfast.data.instructions import read_instructions, write_instruction_examples
from vlmfast.models import Blip2, Llava
from vlmfast.processing.blip2 import Blip2Processor
from vlmfast.processing.llava import LlavaProcessor
from vlmfast.processing.llava_instructions import Blip2InstructionCollator, LlavaInstructionCollator
from vlmfast.train.lora import lora_layers, merge_lora
from vlmfast.train.recipes import apply_stage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return read_instructions(write_instruction_examples(tmp_path_factory.mktemp("data"), n=4, image_size=32))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("llava"), seed=5)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return write_blip2(tmp_path_factory.mktemp("blip2"), seed=5)


def _labelled_text(processor, batch, row):
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=False)


def _train(model, batch, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model.loss(batch["input_ids"], batch["labels"], batch.get("pixel_values"), batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_llava_collator_labels_answers_and_eos(llava_dir, data):
    processor = LlavaProcessor.from_pretrained(llava_dir, padding_side="right")
    batch = LlavaInstructionCollator(processor)(list(data[:2]))
    answer = data[0].messages[-1]["content"][0]["text"]
    # the answer's first token carries the space after "ASSISTANT:"; the EOS follows the answer
    assert _labelled_text(processor, batch, 0) == " " + answer + "</s>"
    per_image = processor.tokens_per_image(32, 32)
    assert ((batch["input_ids"] == processor.image_token_id).sum(1) == per_image).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def test_llava_stage_1_trains_the_projector_only(llava_dir, data):
    model = Llava.from_pretrained(llava_dir)
    trained = apply_stage(model, 1)
    projector = model.model.multi_modal_projector
    assert trained == sum(p.numel() for p in projector.parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = LlavaInstructionCollator(LlavaProcessor.from_pretrained(llava_dir, padding_side="right"))(list(data))
    losses = _train(model.train(), batch)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_llava_stage_2_lora_merges_into_a_checkpoint_transformers_reads(llava_dir, data, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = Llava.from_pretrained(llava_dir)
    apply_stage(model, 2, lora_rank=4)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning and all("lora_" in n or "multi_modal_projector" in n for n in learning)
    assert {n.split(".")[-1] for n, _ in lora_layers(model)} == {"qkv", "o_proj", "gate_up", "down_proj"}
    batch = LlavaInstructionCollator(LlavaProcessor.from_pretrained(llava_dir, padding_side="right"))(list(data))
    losses = _train(model.train(), batch)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    merge_lora(model)
    model.save_pretrained(tmp_path / "out", processor_from=llava_dir)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch["attention_mask"]).logits
    valid = batch["attention_mask"].bool()
    assert (theirs - before)[valid].abs().max().item() <= 1e-4 * before.abs().max().item()


def test_blip2_stage_1_trains_the_qformer_side_only(blip2_dir, data):
    processor = Blip2Processor.from_pretrained(blip2_dir, padding_side="right")
    batch = Blip2InstructionCollator(processor)(list(data))
    assert (batch["input_ids"][:, : processor.num_query_tokens] == processor.image_token_id).all()
    answer = data[1].messages[-1]["content"][0]["text"]
    assert _labelled_text(processor, batch, 1).strip() == answer.strip() + "</s>"
    model = Blip2.from_pretrained(blip2_dir)
    apply_stage(model, 1)
    learning = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert learning == {"query_tokens", "qformer", "language_projection"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model.train(), batch)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_stage_checks_name_the_option(llava_dir, blip2_dir):
    with pytest.raises(ValueError, match="stage: expected one of"):
        apply_stage(Blip2.from_pretrained(blip2_dir), 2)
    with pytest.raises(ValueError, match="lora_rank"):
        apply_stage(Llava.from_pretrained(llava_dir), 2, lora_rank=0)


@pytest.mark.parametrize("family, stage", [("llava", 2), ("blip-2", 1)])
def test_finetune_command_runs_a_stage(family, stage, llava_dir, blip2_dir, tmp_path, capsys):
    import json

    from vlmfast.cli import main
    from vlmfast.models import from_pretrained

    base = llava_dir if family == "llava" else blip2_dir
    data = write_instruction_examples(tmp_path / "data", n=4, image_size=32)
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--stage", str(stage),
            "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--quiet"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    trained = from_pretrained(out)
    reference = from_pretrained(base)
    learnt = reference.parts()["connector"]
    assert report["trainable_parameters"] >= sum(p.numel() for p in learnt)
    changed = {name for name, part in trained.parts().items()
               if any(not torch.equal(a, b) for a, b in zip(part, reference.parts()[name]))}
    # stage 1 moves the connector alone; stage 2 the connector and (through merged LoRA) the decoder
    assert changed == ({"connector", "decoder"} if stage == 2 else {"connector"})
    bad = ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o2"), "--stage", "3"]
    assert main(bad) == 2
    assert "--stage" in capsys.readouterr().err
