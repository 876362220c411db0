"""Instruction data for `vlmfast finetune`: the JSONL reader (normalisation, file:line errors), the
built-in example set, the labels (decoded back to exactly the answers, token ids equal to the
inference processor's), truncation, and the step -> batch function."""

import copy
import json

import pytest
import torch
from PIL import Image

from tests.models.smolvlm_checkpoint import write_processor_files
from vlmfast.data import InstructionCollator, read_instructions, write_instruction_examples
from vlmfast.data.instruction_collate import IGNORE_INDEX
from vlmfast.models.smolvlm import SmolVLMProcessor
from vlmfast.train.finetune import FinetuneConfig, InstructionBatches, PrefetchedBatches

EOT = "<end_of_utterance>"


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """Image splitting on: a 32-pixel image becomes 3 x 3 tiles + the global one (row/col tokens)."""
    folder = write_processor_files(tmp_path_factory.mktemp("processor"), split=True)
    return SmolVLMProcessor.from_pretrained(folder, padding_side="right")


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    return write_instruction_examples(tmp_path_factory.mktemp("examples"), n=9, seed=3)


def _write_jsonl(folder, records, *, images=("a.png", "b.png")):
    for name in images:
        Image.new("RGB", (20, 28), (200, 30, 30)).save(folder / name)
    path = folder / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _user(*parts):
    return {"role": "user", "content": list(parts)}


IMAGE, ASK = {"type": "image"}, {"type": "text", "text": "What is it?"}


def _answer(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _answers(example):
    return [m["content"][0]["text"] for m in example.messages if m["role"] == "assistant"]


def _labelled_runs(labels):
    """Contiguous runs of labelled token ids in a row."""
    runs, current = [], []
    for value in labels.tolist() + [IGNORE_INDEX]:
        if value != IGNORE_INDEX:
            current.append(value)
        elif current:
            runs, current = runs + [current], []
    return runs


# ----------------------------------------------------------------------------- reading

def test_built_in_examples_are_deterministic_and_valid(tmp_path, examples_file):
    again = write_instruction_examples(tmp_path, n=9, seed=3)
    assert again.read_text() == examples_file.read_text()
    for name in sorted((tmp_path / "images").iterdir()):
        assert name.read_bytes() == (examples_file.parent / "images" / name.name).read_bytes()
    examples = read_instructions(examples_file)
    assert len(examples) == 9
    assert any(len(_answers(e)) == 2 for e in examples)  # follow-up turns exist
    assert all(len(e.images) == 1 and e.images[0].is_file() for e in examples)
    assert write_instruction_examples(tmp_path / "other", n=9, seed=4).read_text() != examples_file.read_text()


def test_plain_string_content_reads_as_one_text_part(tmp_path):
    path = _write_jsonl(tmp_path, [
        {"images": ["a.png"], "messages": [_user(IMAGE, ASK), {"role": "assistant", "content": "A dog."}]},
        {"images": [], "messages": [{"role": "user", "content": "Hello <image>"}, _answer("Hi.")], "extra": 1},
    ], images=("a.png",))
    with pytest.raises(ValueError, match=r"data\.jsonl:2: images: 0 image\(s\) but 1 <image> placeholder"):
        read_instructions(path)
    path.write_text(path.read_text().splitlines()[0] + "\n")
    (example,) = read_instructions(path)
    assert example.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}
    assert example.images == ((tmp_path / "a.png").resolve(),)


@pytest.mark.parametrize("record, message", [
    ({"images": ["missing.png"], "messages": [_user(IMAGE, ASK), _answer("x")]}, r"images\[0\]: no such file"),
    ({"images": [], "messages": [_user(ASK)]}, r"messages: no assistant turn"),
    ({"images": ["a.png"], "messages": [_user(IMAGE, IMAGE, ASK), _answer("x")]},
     r"images: 1 image\(s\) but 2 <image> placeholder"),
    ({"images": ["a.png", "b.png"], "messages": [_user(IMAGE, ASK), _answer("x")]},
     r"images: 2 image\(s\) but 1 <image> placeholder"),
    ({"images": ["a.png"], "messages": [_user(ASK), {"role": "assistant", "content": [IMAGE]}]},
     r"messages\[1\]\.content: an assistant turn cannot hold images"),
    ({"images": [], "messages": [{"role": "robot", "content": "hi"}, _answer("x")]}, r"messages\[0\]\.role"),
    ({"images": [], "messages": [_user({"type": "text"}), _answer("x")]}, r"messages\[0\]\.content\[0\]\.text"),
    ({"images": [], "messages": [_user(ASK), _answer("  ")]},
     r"messages\[1\]\.content: the assistant's answer is empty"),
    ({"images": "a.png"}, r"messages: expected a non-empty list"),
    ("{not json", r"not valid JSON"),
    ("[1, 2]", r"expected a JSON object"),
])
def test_bad_data_names_the_file_line_and_field(tmp_path, record, message):
    good = {"images": ["a.png"], "messages": [_user(IMAGE, ASK), _answer("A red square.")]}
    path = _write_jsonl(tmp_path, [good, good, record])
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: {message}"):
        read_instructions(path)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data: no such file"):
        read_instructions(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no examples"):
        read_instructions(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- labels

def test_labels_decode_back_to_exactly_the_answers(processor, examples_file):
    examples = read_instructions(examples_file)
    batch = InstructionCollator(processor)(examples)
    eot_id = processor.tokenizer.token_to_id(EOT)
    for b, example in enumerate(examples):
        runs = _labelled_runs(batch["labels"][b])
        answers = _answers(example)
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            assert run[-1] == eot_id  # the end-of-turn token closes every answer and is learnt
            assert processor.decode(run, skip_special_tokens=False) == f" {answer}{EOT}"
        labelled = batch["labels"][b] != IGNORE_INDEX
        assert torch.equal(batch["labels"][b][labelled], batch["input_ids"][b][labelled])
        assert not (batch["input_ids"][b][labelled] == processor.image_token_id).any()


def test_token_ids_equal_the_inference_processor_and_padding_is_right(processor, examples_file):
    examples = read_instructions(examples_file)[:4]
    batch = InstructionCollator(processor)(examples)
    texts = [processor.apply_chat_template(list(e.messages)) for e in examples]
    expected = processor(texts, [e.load_images() for e in examples])
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: padding is exercised
    for b in range(len(examples)):
        n = int(lengths[b])
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
        assert torch.equal(batch["input_ids"][b, :n], expected["input_ids"][b, expected["attention_mask"][b].bool()])
        assert (batch["input_ids"][b, n:] == processor.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert torch.equal(batch["pixel_attention_mask"], expected["pixel_attention_mask"])


def test_images_in_a_later_turn_and_text_only_rows(processor, tmp_path):
    path = _write_jsonl(tmp_path, [
        {"images": ["a.png", "b.png"], "messages": [
            _user(IMAGE, ASK), _answer("A red square."), _user({"type": "text", "text": "And this?"}, IMAGE),
            _answer("Also red.")]},
        {"images": [], "messages": [{"role": "system", "content": "Be brief."}, _user(ASK), _answer("Nothing.")]},
    ])
    examples = read_instructions(path)
    batch = InstructionCollator(processor)(examples)
    assert batch["pixel_values"].shape[:2] == (2, 20)  # two split images (10 frames each); row 2 none
    assert not batch["pixel_attention_mask"][1].any()
    for b, example in enumerate(examples):
        decoded = [processor.decode(r, skip_special_tokens=True) for r in _labelled_runs(batch["labels"][b])]
        assert [d.strip() for d in decoded] == _answers(example)
    text_only = InstructionCollator(processor)(examples[1:])
    assert "pixel_values" not in text_only


def test_truncation_cuts_the_end_never_an_image(processor, tmp_path):
    path = _write_jsonl(tmp_path, [{"images": ["a.png"], "messages": [
        _user(IMAGE, ASK), _answer("A red square with a long answer that goes on."), _user(ASK), _answer("Red.")]}])
    (example,) = read_instructions(path)
    full = InstructionCollator(processor)([example])
    n = full["input_ids"].shape[1]
    first_answer = int((full["labels"][0] != IGNORE_INDEX).nonzero()[0])
    cut = first_answer + 3
    short = InstructionCollator(processor, max_length=cut)([example])
    assert torch.equal(short["input_ids"], full["input_ids"][:, :cut])
    assert torch.equal(short["labels"], full["labels"][:, :cut])
    assert torch.equal(InstructionCollator(processor, max_length=n)([example])["input_ids"], full["input_ids"])
    with pytest.raises(ValueError, match=r"data\.jsonl:1: .* no answer token lies before the cut"):
        InstructionCollator(processor, max_length=first_answer)([example])
    with pytest.raises(ValueError, match=r"data\.jsonl:1: .* an image is never cut"):
        InstructionCollator(processor, max_length=20)([example])
    with pytest.raises(ValueError, match="max_length: expected None or an int >= 2"):
        InstructionCollator(processor, max_length=1)


# ----------------------------------------------------------------------------- batches of a step

def test_batches_are_a_pure_function_of_the_step(processor, examples_file):
    examples = read_instructions(examples_file)
    batches = InstructionBatches(examples, InstructionCollator(processor), batch_size=2, grad_accum=2, seed=7)
    seen = [i for step in range(9) for micro in range(2) for i in batches.indices(step, micro)]
    for epoch in range(4):  # 36 samples = 4 epochs of 9: each epoch a permutation, epochs differ
        assert sorted(seen[epoch * 9:(epoch + 1) * 9]) == list(range(9))
    assert seen[:9] != seen[9:18]
    fresh = InstructionBatches(examples, InstructionCollator(processor), batch_size=2, grad_accum=2, seed=7)
    assert fresh.indices(5, 1) == batches.indices(5, 1)  # no hidden position: a resumed run sees the same
    first, again = batches(3, 1), fresh(3, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = InstructionBatches(examples, InstructionCollator(processor), batch_size=2, grad_accum=2, seed=8)
    assert [other.indices(s, 0) for s in range(4)] != [batches.indices(s, 0) for s in range(4)]


def test_prefetching_returns_the_same_batches_and_computes_each_once():
    calls = []

    def batches(step, micro):
        calls.append((step, micro))
        if step == 2 and micro == 1:
            raise ValueError("data.jsonl:7: broken")
        return torch.tensor([step, micro])

    prefetched = PrefetchedBatches(batches, grad_accum=2, steps=4)
    try:
        for key in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]:
            assert prefetched(*key).tolist() == list(key)
        with pytest.raises(ValueError, match="data.jsonl:7: broken"):  # an error is raised where it belongs
            prefetched(2, 1)
        assert prefetched(3, 1).tolist() == [3, 1]  # a jump (resume) is computed on the spot; nothing past step 3
    finally:
        prefetched.close()
    # each key computed at most once ((3, 0), prefetched then skipped, may have been cancelled in time)
    assert len(calls) == len(set(calls))
    assert set(calls) - {(3, 0)} == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 1)}
    assert all(step < 4 for step, _ in calls)


def test_bad_finetune_options():
    with pytest.raises(ValueError, match="steps: expected at least 1"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="batch_size: expected at least 1"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(ValueError, match="lora_rank: expected 0"):
        FinetuneConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="lora_alpha, lora_targets: given without lora_rank"):
        FinetuneConfig(lora_targets="q_proj")
    with pytest.raises(ValueError, match="freeze_vision, freeze_decoder: both frozen without LoRA"):
        FinetuneConfig(freeze_vision=True, freeze_decoder=True)
    with pytest.raises(ValueError, match="base_dtype: expected 'float32' or 'bfloat16'"):
        FinetuneConfig(base_dtype="float16")
    with pytest.raises(ValueError, match="base_dtype: 'bfloat16' needs lora_rank > 0 and bf16"):
        FinetuneConfig(base_dtype="bfloat16", bf16=True)
    assert FinetuneConfig(lora_rank=2, lora_targets="q_proj,v_proj").lora_targets == ("q_proj", "v_proj")


def test_an_answer_first_conversation_and_a_template_that_is_not_turn_by_turn(processor, tmp_path):
    messages = [_answer("Hello there."), _user(ASK), _answer("A cat.")]
    path = _write_jsonl(tmp_path, [{"images": [], "messages": messages}])
    (example,) = read_instructions(path)
    batch = InstructionCollator(processor)([example])
    decoded = [processor.decode(r, skip_special_tokens=False) for r in _labelled_runs(batch["labels"][0])]
    assert decoded == [f" Hello there.{EOT}", f" A cat.{EOT}"]
    counting = copy.copy(processor)  # the number of turns first: a prefix rendering is not a prefix
    counting.chat_template = "{{ messages | length }}" + processor.chat_template
    with pytest.raises(ValueError, match=r"data\.jsonl:1: messages\[0\]: the chat template does not render"):
        InstructionCollator(counting)([example])


def test_an_unreadable_image_is_reported_with_file_and_line_when_batched(processor, tmp_path):
    path = _write_jsonl(tmp_path, [{"images": ["a.png"], "messages": [_user(IMAGE, ASK), _answer("Red.")]}],
                        images=("a.png",))
    (example,) = read_instructions(path)
    (tmp_path / "a.png").write_bytes(b"not a png")  # broken after the file was read
    with pytest.raises(ValueError, match=r"data\.jsonl:1: images\[0\]: .*a\.png: cannot open as an image"):
        InstructionCollator(processor)([example])
