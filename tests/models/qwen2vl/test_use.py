"""Qwen2-VL end to end on a tiny random-weight checkpoint with a real tokenizer:
vlmfast.pipeline("image-text-to-text") against transformers' processor + generate, `vlmfast
generate`, and `vlmfast finetune` (LoRA, frozen vision tower) from the built-in example set: the
collated batch's loss and gradients against transformers, the loss going down, the frozen tower
bit-identical, the output loading in transformers."""

import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import vlmfast  # noqa: E402
from tests.models.chat_inputs import random_image as _image  # noqa: E402
from tests.models.qwen2vl.helpers import CHAT_TEMPLATE, write_checkpoint  # noqa: E402
from vlmfast.cli import main  # noqa: E402
from vlmfast.data import read_instructions, write_instruction_examples  # noqa: E402
from vlmfast.models.qwen2vl import Qwen2VL  # noqa: E402
from vlmfast.processing.qwen2vl_instructions import Qwen2VLInstructionCollator  # noqa: E402
from vlmfast.processing.qwen2vl_processor import Qwen2VLProcessor  # noqa: E402
from vlmfast.train.finetune import finetune, instruction_loss  # noqa: E402

transformers.logging.set_verbosity_error()
NEW = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl_ckpt"), "qwen2_5_vl", seed=3)
    images = tmp_path_factory.mktemp("images")
    for name, (h, w, seed) in {"a.png": (60, 90, 1), "b.png": (40, 40, 2)}.items():
        _image(h, w, seed).save(images / name)
    return path, images


def _hf_processor(path):
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class ImagesOnly(Qwen2_5_VLProcessor):  # its video processor needs torchvision
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    return ImagesOnly(image_processor=transformers.Qwen2VLImageProcessorPil.from_pretrained(path),
                      tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                      video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
                      chat_template=CHAT_TEMPLATE)


def test_pipeline_answers_as_transformers(checkpoint):
    path, folder = checkpoint
    pipe = vlmfast.pipeline("image-text-to-text", model=path, max_new_tokens=NEW)
    assert type(pipe.model) is Qwen2VL and type(pipe.processor) is Qwen2VLProcessor
    samples = [[Image.open(folder / "a.png")], [], [Image.open(folder / "a.png"), Image.open(folder / "b.png")]]
    prompts = ["What is in this image?", "Say something.", "Compare them."]
    answers = pipe(samples, prompts)
    processor, hf = _hf_processor(path), transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(s)
                                             + [{"type": "text", "text": p}]}], add_generation_prompt=True)
             for s, p in zip(samples, prompts)]
    inputs = processor(text=texts, images=[i for s in samples for i in s], return_tensors="pt", padding=True,
                       padding_side="left")
    with torch.no_grad():
        out = hf.eval().generate(**inputs, do_sample=False, max_new_tokens=NEW)
    expected = [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                           skip_special_tokens=True)]
    assert answers == expected and any(expected)
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(folder / "a.png")},
                                                 {"type": "text", "text": prompts[0]}]}]
    assert pipe(conversation) == answers[:1]


def test_cli_generate(checkpoint, capsys):
    path, folder = checkpoint
    pipe = vlmfast.pipeline("image-text-to-text", model=path, max_new_tokens=NEW)
    code = main(["generate", "--model", str(path), "--image", str(folder / "b.png"), "--prompt", "What is it?",
                 "--max-new-tokens", str(NEW)])
    assert code == 0
    assert capsys.readouterr().out == pipe([folder / "b.png"], ["What is it?"])[0] + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_instruction_examples(tmp_path_factory.mktemp("examples"), n=6, seed=0)


def test_collated_batch_loss_and_gradients_match_transformers(checkpoint, data):
    path, _ = checkpoint
    processor = Qwen2VLProcessor.from_pretrained(path, padding_side="right")
    examples = read_instructions(data)[:4]
    batch = Qwen2VLInstructionCollator(processor)(examples)
    labelled = batch["labels"][batch["labels"] != -100]
    answers = sum(m["role"] == "assistant" for e in examples for m in e.messages)
    assert int((labelled == processor.tokenizer.token_to_id("<|im_end|>")).sum()) == answers  # one per answer
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path).train()
    types_ = (batch["input_ids"] == processor.image_token_id).long()
    expected = hf(**batch, mm_token_type_ids=types_).loss
    expected.backward()
    ours = Qwen2VL.from_pretrained(path).train()
    actual = instruction_loss(ours, batch["input_ids"], batch["labels"], batch["attention_mask"],
                              batch["pixel_values"], batch["image_grid_thw"])
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    theirs = dict(hf.named_parameters())
    for name in ("model.visual.blocks.1.mlp.down_proj.weight", "model.language_model.layers.1.mlp.down_proj.weight",
                 "model.visual.patch_embed.proj.weight"):
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, theirs[name].grad, rtol=1e-4, atol=1e-6)


def test_lora_fine_tune_with_a_frozen_tower(checkpoint, data, tmp_path):
    path, _ = checkpoint
    processor = Qwen2VLProcessor.from_pretrained(path, padding_side="right")
    batch = Qwen2VLInstructionCollator(processor)(read_instructions(data))
    args = lambda model: (batch["input_ids"], batch["labels"], batch["attention_mask"],  # noqa: E731
                          batch["pixel_values"], batch["image_grid_thw"])
    with torch.no_grad():
        before = float(instruction_loss(Qwen2VL.from_pretrained(path).eval(), *args(None)))
    report = finetune(path, data, tmp_path, log=None, steps=6, lr=3e-2, lora_rank=4, freeze_vision=True,
                      batch_size=3, threads=1)
    tuned = Qwen2VL.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = float(instruction_loss(tuned, *args(None)))
    assert after < before - 0.1, (before, after)
    assert report["trainable_parameters"] < report["parameters"] // 10
    base, out = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(base) == set(out)
    for name in base:
        if name.startswith("visual.") and "merger" not in name:
            assert torch.equal(base[name], out[name]), name
        elif name.startswith("model.layers.") and name.endswith("q_proj.weight"):
            assert not torch.equal(base[name], out[name]), name
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    with torch.no_grad():
        expected = hf(**inputs, mm_token_type_ids=(batch["input_ids"] == processor.image_token_id).long()).logits
        actual = tuned(**inputs)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)
