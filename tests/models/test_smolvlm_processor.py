"""SmolVLMProcessor (tokenizers + jinja2, no transformers) against transformers' SmolVLMProcessor
on the same offline checkpoint folder."""

import pytest
import torch

pytest.importorskip("transformers")

from tests.models.chat_inputs import random_image as _image  # noqa: E402
from tests.models.chat_inputs import user_turn as _user  # noqa: E402
from tests.models.smolvlm_checkpoint import CHAT_TEMPLATE, hf_processor, write_processor_files  # noqa: E402
from vlmfast.models.smolvlm.processor import SmolVLMProcessor  # noqa: E402


CONVERSATIONS = [
    [_user("How many dogs are there?")],
    [_user(None, "What is in this image?")],
    [_user(None, None, "Compare the two images.")],
    [_user("Hi"), {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}, _user(None, "And this?")],
]


@pytest.fixture(scope="module", params=[True, False], ids=["split", "unsplit"])
def folders(request, tmp_path_factory):
    path = write_processor_files(tmp_path_factory.mktemp("smolvlm_proc"), split=request.param)
    return SmolVLMProcessor.from_pretrained(path), hf_processor(path)


@pytest.mark.parametrize("generation", [True, False])
def test_chat_template_matches_transformers(folders, generation):
    ours, theirs = folders
    for conversation in CONVERSATIONS:
        expected = theirs.apply_chat_template(conversation, add_generation_prompt=generation)
        assert ours.apply_chat_template(conversation, add_generation_prompt=generation) == expected
    batched = ours.apply_chat_template(CONVERSATIONS, add_generation_prompt=generation)
    assert batched == [theirs.apply_chat_template(c, add_generation_prompt=generation) for c in CONVERSATIONS]


def test_transformers_default_template_with_string_contents(folders):
    """transformers' SmolVLM fallback template (string contents, video slots), passed explicitly."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    ours, theirs = folders
    conversations = CONVERSATIONS + [[{"role": "system", "content": "Be brief."}, _user(None, "What?")]]
    for conversation in conversations:
        for generation in (True, False):
            expected = theirs.apply_chat_template(conversation, chat_template=DEFAULT_CHAT_TEMPLATE,
                                                  add_generation_prompt=generation)
            assert ours.apply_chat_template(conversation, chat_template=DEFAULT_CHAT_TEMPLATE,
                                            add_generation_prompt=generation) == expected


@pytest.mark.parametrize("where", ["chat_template.json", "tokenizer_config.json"])
def test_chat_template_read_from_each_place(tmp_path, where):
    proc = SmolVLMProcessor.from_pretrained(write_processor_files(tmp_path, template_file=where))
    assert proc.chat_template == CHAT_TEMPLATE
    assert proc.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True) == \
        "<|im_start|>User:<image>What is in this image?<end_of_utterance>\nAssistant:"


def _compare(ours, theirs, texts, images):
    got = ours(texts, images)
    want = theirs(text=texts, images=images, return_tensors="pt", padding=True)
    assert set(got) == {k for k in want if k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    for key, value in got.items():
        assert value.dtype == want[key].dtype, key
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    return got


def test_inputs_match_transformers_batch_of_0_1_2_images(folders):
    ours, theirs = folders
    texts = ours.apply_chat_template(CONVERSATIONS[:3], add_generation_prompt=True)
    images = [[], [_image(50, 70, 1)], [_image(113, 37, 2), _image(32, 32, 3)]]
    got = _compare(ours, theirs, texts, images)
    assert (got["attention_mask"][:, -1] == 1).all()  # left padded
    assert got["attention_mask"].sum(1).tolist() != [got["input_ids"].shape[1]] * 3
    assert (got["input_ids"] == ours.image_token_id).sum().item() > 0


def test_inputs_match_transformers_single_prompt_and_text_only(folders):
    ours, theirs = folders
    text = ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    _compare(ours, theirs, text, _image(40, 90, 4))  # one image, one sample
    texts = ours.apply_chat_template([CONVERSATIONS[0], CONVERSATIONS[3][:1]], add_generation_prompt=True)
    got = ours(texts)
    want = theirs(text=texts, return_tensors="pt", padding=True)
    assert set(got) == {"input_ids", "attention_mask"}
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(got[key], want[key]), key


def test_decode_matches_transformers(folders):
    ours, theirs = folders
    texts = ours.apply_chat_template(CONVERSATIONS[:3], add_generation_prompt=True)
    ids = ours(texts, [[], [_image(50, 70, 1)], [_image(20, 30, 2), _image(64, 33, 3)]])["input_ids"]
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[2], skip_special_tokens=skip) == theirs.decode(ids[2], skip_special_tokens=skip)
    assert ours.decode(ids[0]) == "User: How many dogs are there?\nAssistant:"


def test_image_seq_len_and_special_ids(folders):
    ours, theirs = folders
    assert ours.image_seq_len == theirs.image_seq_len
    assert ours.image_token_id == theirs.image_token_id
    assert ours.pad_token_id == theirs.tokenizer.pad_token_id
    assert ours.end_of_utterance_id == theirs.tokenizer.convert_tokens_to_ids("<end_of_utterance>")


def test_bad_inputs_name_the_argument(folders, tmp_path):
    ours, _ = folders
    with pytest.raises(ValueError, match=r"texts\[0\]: expected 2 <image> token\(s\)"):
        ours(["<image> one"], [[_image(40, 40, 0), _image(40, 40, 1)]])
    with pytest.raises(ValueError, match="images: text has \\[1\\] <image> token"):
        ours("<image> but no image")
    with pytest.raises(ValueError, match="images: expected one list of images per text \\(2\\), got 1"):
        ours(["<image>a", "<image>b"], [_image(40, 40, 0), _image(40, 40, 1)])
    with pytest.raises(TypeError, match="text: expected a string"):
        ours([1, 2])
    with pytest.raises(TypeError, match=r"messages\[0\]: expected a dict with 'role' and 'content'"):
        ours.apply_chat_template([{"text": "hi"}])
    with pytest.raises(TypeError, match="messages: expected a conversation"):
        ours.apply_chat_template("hello")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SmolVLMProcessor.from_pretrained(tmp_path)
    no_template = SmolVLMProcessor(ours.tokenizer, image_seq_len=4)
    with pytest.raises(ValueError, match="chat_template: the checkpoint has none"):
        no_template.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="no pad_token"):
        no_template(["a", "a longer text"])
    with pytest.raises(ValueError, match="images: this processor has no image processor"):
        no_template("<image>", _image(40, 40, 0))
    with pytest.raises(ValueError, match="image_seq_len: expected a positive int"):
        SmolVLMProcessor(ours.tokenizer, image_seq_len=0)
