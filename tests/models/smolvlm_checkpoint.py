"""A tiny SmolVLM checkpoint folder written offline: a byte-level BPE tokenizer.json trained
here on a few sentences with SmolVLM's special tokens, tokenizer_config.json, the chat template,
preprocessor_config.json (32-pixel tiles), processor_config.json and, optionally, random
weights saved by transformers (the tiny architecture of smolvlm_helpers)."""

import json
from pathlib import Path

from tests.models.smolvlm_helpers import IMAGE_SEQ_LEN, IMAGE_SIZE, hf_config_dict

# SmolVLM's chat template (the instruct checkpoints' chat_template.json), images and text only.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                  "<global-img>", "<image>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
CORPUS = ["User: What is in this image? Assistant: A cat sitting on a red mat.",
          "Describe this image in one sentence.", "How many dogs are there? Two.",
          "A man riding a horse on the beach at sunset."]


def train_tokenizer(vocab_size: int = 340):
    from vlmfast.processing.tokenizer_training import train_byte_level_bpe

    return train_byte_level_bpe(CORPUS * 4, SPECIAL_TOKENS, vocab_size=vocab_size)


def write_processor_files(path, *, split: bool = True, template_file: str = "chat_template.jinja") -> Path:
    """Everything but the weights. template_file: chat_template.jinja, chat_template.json or
    tokenizer_config.json (where the template is stored)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(path / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|endoftext|>", "eos_token": "<end_of_utterance>",
        "padding_side": "left", "model_max_length": 8192,
        "extra_special_tokens": {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                 "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    }
    if template_file == "tokenizer_config.json":
        settings["chat_template"] = CHAT_TEMPLATE
    elif template_file == "chat_template.json":
        (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    else:
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SmolVLMImageProcessor", "do_image_splitting": split,
        "max_image_size": {"longest_edge": IMAGE_SIZE}, "size": {"longest_edge": 3 * IMAGE_SIZE},
        "resample": 1, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }, indent=2))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor",
                                                            "image_seq_len": IMAGE_SEQ_LEN}))
    return path


def write_checkpoint(path, *, seed: int = 0, split: bool = True) -> Path:
    """A loadable SmolVLM checkpoint with random weights (transformers' save_pretrained) whose
    vocabulary and image token are the tokenizer's; generation stops at <end_of_utterance>."""
    import torch
    from tokenizers import Tokenizer
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    path = write_processor_files(path, split=split)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    config = hf_config_dict()
    pad = tok.token_to_id("<|endoftext|>")
    config["text_config"].update(vocab_size=tok.get_vocab_size(), pad_token_id=pad)
    config["image_token_id"] = tok.token_to_id("<image>")
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**config))
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({
        "eos_token_id": tok.token_to_id("<end_of_utterance>"), "pad_token_id": pad}))
    return path


def hf_processor(path):
    """transformers' SmolVLMProcessor on the same folder, built without its video processor
    (which needs torchvision) and without num2words (used for video prompts only)."""
    import types

    import transformers
    import transformers.models.smolvlm.processing_smolvlm as hf_module

    if hf_module.num2words is None:
        hf_module.num2words = str  # only video prompts spell numbers

    class ImagesOnly(hf_module.SmolVLMProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    path = Path(path)
    return ImagesOnly(
        image_processor=transformers.SmolVLMImageProcessorPil.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path),
        video_processor=types.SimpleNamespace(num_frames=64, fps=1),
        image_seq_len=json.loads((path / "processor_config.json").read_text())["image_seq_len"],
        chat_template=(path / "chat_template.jinja").read_text() if (path / "chat_template.jinja").is_file() else None,
    )
