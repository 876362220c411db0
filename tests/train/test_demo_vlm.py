"""`vlmfast demo vlm` and build_tiny_smolvlm: a few-step demo runs end to end through the CLI and
leaves a checkpoint folder that vlmfast and transformers load with the same processor inputs,
the same logits and the same greedy tokens; `vlmfast generate`, `finetune` and `eval vqa` run on
it as the README shows; reruns start over and a foreign folder is refused. The full demo's
accuracy (>= 80 % VQA on held-out images) runs under VLMFAST_SLOW=1."""

import json
import os

import pytest
import torch

from vlmfast.cli import build_parser, main
from vlmfast.data.instructions import shape_questions
from vlmfast.data.shape_questions import KINDS, shape_vqa_items
from vlmfast.eval.vqa import normalize_answer
from vlmfast.models.smolvlm import SmolVLM, SmolVLMProcessor
from vlmfast.processing import load_image
from vlmfast.train.demo_vlm import MARKER, TinySmolVLM, build_tiny_smolvlm

TINY = ["--steps", "3", "--batch-size", "8", "--train-images", "24", "--test-images", "5", "--threads", "1"]
REPORT_FIELDS = {"vqa_accuracy", "per_question_type", "num_questions", "num_test_images", "examples", "steps",
                 "train_seconds", "total_seconds", "model", "data", "vqa_questions", "vqa_annotations", "out"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "vlm"
    assert main(["demo", "vlm", *TINY, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def report(demo):
    return json.loads((demo / "report.json").read_text())


def _chat_inputs(processor, image_path, question="What shape is this?"):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    return text, processor([text], [[load_image(image_path)]])


def test_demo_writes_data_models_and_a_report(demo, report, capsys):
    model = demo / "model"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json", "metrics.jsonl"):
        assert (model / name).is_file(), name
    assert REPORT_FIELDS <= set(report) and report["steps"] == 3
    assert report["num_test_images"] == 5 and report["num_questions"] == 5 * len(KINDS)
    assert 0.0 <= report["vqa_accuracy"] <= 1.0 and set(report["per_question_type"]) == set(KINDS)
    assert len((model / "metrics.jsonl").read_text().splitlines()) == 3
    # the VQA report's predictions are the demo's generations on the questions it wrote
    vqa = json.loads((demo / "vqa_report.json").read_text())
    questions = json.loads((demo / "data" / "vqa" / "questions.json").read_text())["questions"]
    assert [p["question_id"] for p in vqa["predictions"]] == [q["question_id"] for q in questions]
    assert (demo / "data" / "vqa" / questions[-1]["image"]).is_file()


def test_vqa_annotations_are_the_normalised_answers_of_the_held_out_images(demo):
    shapes, items = shape_vqa_items(5, seed=1_000_003)
    annotations = json.loads((demo / "data" / "vqa" / "annotations.json").read_text())["annotations"]
    assert len(annotations) == len(items)
    for entry, (i, kind, question, answer) in zip(annotations, items):
        assert entry["question_type"] == kind
        assert {a["answer"] for a in entry["answers"]} == {normalize_answer(answer)}
        assert answer == shape_questions(shapes[i].attributes)[kind][1]
    assert normalize_answer("A red circle.") == "red circle"  # what a right answer scores against


def test_vlmfast_and_transformers_load_the_demo_model_with_equal_inputs_and_logits(demo):
    transformers = pytest.importorskip("transformers")
    from tests.models.smolvlm_checkpoint import hf_processor

    model_dir = demo / "model"
    image = demo / "data" / "vqa" / "images" / "00001.png"
    ours = SmolVLMProcessor.from_pretrained(model_dir)
    text, inputs = _chat_inputs(ours, image, "Where is the shape?")
    theirs = hf_processor(model_dir)(text=[text], images=[[load_image(image)]], return_tensors="pt")
    assert inputs["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.image_token == "<image>"

    model = SmolVLM.from_pretrained(model_dir)
    hf = transformers.SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**inputs)
        expected = hf(**{k: theirs[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                 "pixel_attention_mask")}).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # greedy generation stops at <end_of_utterance> (generation_config.json) in both
    ours_out = model.generate(**inputs, max_new_tokens=6)
    hf_out = hf.generate(**{k: theirs[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                   "pixel_attention_mask")}, max_new_tokens=6, do_sample=False)
    assert ours_out.tolist() == hf_out.tolist()


def test_generate_finetune_and_eval_vqa_commands_run_on_the_demo(demo, report, tmp_path, capsys):
    """The README's commands on the demo's folder."""
    model, example = report["model"], report["examples"][0]
    capsys.readouterr()
    assert main(["generate", "--model", model, "--image", example["image"], "--prompt", example["question"],
                 "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    pipe_answer = report["examples"][0]["answer"]  # the demo's own evaluation, greedy, same prompt
    assert pipe_answer in printed

    out = tmp_path / "tuned"
    assert main(["finetune", "--model", model, "--data", report["data"], "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--threads", "1", "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 2
    assert SmolVLM.from_pretrained(out).config == SmolVLM.from_pretrained(model).config

    capsys.readouterr()
    assert main(["eval", "vqa", "--model", model, "--questions", report["vqa_questions"],
                 "--annotations", report["vqa_annotations"], "--images", report["vqa_images"],
                 "--prompt", "{question}", "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["num_questions"] == report["num_questions"]
    assert evaluated["accuracy"] == pytest.approx(report["vqa_accuracy"])


def test_rerun_starts_over_and_a_foreign_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "vlm", *TINY, "--test-images", "6", "--out", str(out), "--quiet"]) == 0
    (out / "model" / "leftover.txt").write_text("from the first run")
    assert main(["demo", "vlm", *TINY, "--out", str(out), "--quiet"]) == 0
    assert not (out / "model" / "leftover.txt").exists() and (out / MARKER).is_file()
    assert json.loads((out / "report.json").read_text())["num_test_images"] == 5

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["demo", "vlm", *TINY, "--out", str(foreign)]) == 2
    assert "--out" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"


def test_demo_choice_defaults_to_clip():
    parser = build_parser()
    assert parser.parse_args(["demo"]).model == "clip"
    assert parser.parse_args(["demo", "vlm", "--steps", "5"]).model == "vlm"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "gpt"])


def test_build_tiny_smolvlm_folder_loads_and_its_tokenizer_round_trips(tmp_path):
    path = build_tiny_smolvlm(tmp_path / "tiny", seed=3)
    processor = SmolVLMProcessor.from_pretrained(path)
    text = "User: What colour is the shape? Ünïcode 123 <end_of_utterance>\nAssistant: A green triangle."
    ids = processor.encode([text])[0]
    assert processor.decode(ids, skip_special_tokens=False) == text
    for token in ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>",
                  "<row_2_col_3>"):
        assert len(processor.encode([token])[0]) == 1, token  # special tokens are never split
    model = SmolVLM.from_pretrained(path)
    architecture = TinySmolVLM()
    assert model.config.image_seq_len == processor.image_seq_len == architecture.image_seq_len
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.text_config.vocab_size == processor.tokenizer.get_vocab_size()
    assert model.generation_defaults["eos_token_id"] == processor.end_of_utterance_id
    # a fresh seed gives fresh weights: the folder is a function of the seed
    other = SmolVLM.from_pretrained(build_tiny_smolvlm(tmp_path / "other", seed=4))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_the_pretrained_siglip_tower_is_the_smolvlm_tower(tmp_path):
    """Stage 1's SigLIP vision transformer, handed to build_tiny_smolvlm, gives the saved SmolVLM's
    vision tower the same patch features (the tower the decoder is then trained on)."""
    from vlmfast.data.synthetic import SyntheticShapes
    from vlmfast.train.demo_vlm_vision import IMAGE_MEAN, IMAGE_STD, pretrain_vision_tower, vision_tower_state

    architecture = TinySmolVLM()
    images, captions, _ = SyntheticShapes(24, image_size=architecture.image_size, seed=5).batch(range(24))
    siglip = pretrain_vision_tower(architecture, images, captions, steps=2, batch_size=8)
    path = build_tiny_smolvlm(tmp_path / "grafted", seed=1, vision_tower=vision_tower_state(siglip))
    model = SmolVLM.from_pretrained(path)
    pixels = (torch.from_numpy(images[:3]).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGE_STD).view(3, 1, 1)
    side = architecture.image_size // architecture.patch_size
    with torch.no_grad():
        expected = siglip.vision_model.forward_tokens(pixels)
        got = model.model.vision_model(pixels, torch.ones(3, side, side, dtype=torch.bool))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="images"):
        pretrain_vision_tower(architecture, images[:, :16], captions, steps=1)


@pytest.mark.skipif(os.environ.get("VLMFAST_SLOW") != "1", reason="the full VLM demo (~2 min); VLMFAST_SLOW=1 runs it")
def test_full_demo_reaches_80_percent_vqa_accuracy(tmp_path):
    out = tmp_path / "full"
    assert main(["demo", "vlm", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["vqa_accuracy"] >= 0.8, report["per_question_type"]
