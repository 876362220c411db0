"""BLIP-2 processing, as transformers 5's Blip2Processor: BLIP image processing (one image per
prompt), the prompt tokenised (with its BOS), padded, and then num_query_tokens <image> tokens put
in front of every row (before its padding and BOS), where the model writes the Q-Former's outputs.

    processor = Blip2Processor.from_pretrained("path/to/blip2-opt-2.7b")
    inputs = processor(["Question: what is this? Answer:"], [image])
    out = model.generate(**inputs, max_new_tokens=10)

BLIP-2 has no chat template: a conversation is rendered as its text (BLIP2_PROMPT_TEMPLATE) unless
the checkpoint ships a template.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlmfast.processing.auto import image_processor_if_any
from vlmfast.processing.batch import is_image
from vlmfast.processing.prompt_processor import PromptProcessor
from vlmfast.processing.tokenizer_files import read_json

# A conversation as BLIP-2 reads prompts: no roles, no image markers (the image tokens are put in
# front by the processor); the user's text, and an assistant's answer after it with a space (the
# training format of captions and answers).
BLIP2_PROMPT_TEMPLATE = (
    "{%- set ns = namespace(out='') -%}"
    "{%- for message in messages if message['role'] in ('user', 'assistant') -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and ns.out -%}{%- set text = ' ' + text -%}{%- endif -%}"
    "{%- set ns.out = ns.out + text -%}"
    "{%- endfor -%}{{ ns.out }}"
)
DEFAULT_NUM_QUERY_TOKENS = 32


class Blip2Processor(PromptProcessor):
    """texts (+ one image per text) -> Blip2.forward / generate inputs; ids -> text."""

    def __init__(self, tokenizer, image_processor=None, *, num_query_tokens: int = DEFAULT_NUM_QUERY_TOKENS,
                 image_token: str = "<image>", **kwargs):
        if isinstance(num_query_tokens, bool) or not isinstance(num_query_tokens, int) or num_query_tokens < 1:
            raise ValueError(f"num_query_tokens: expected a positive int, got {num_query_tokens!r}")
        if tokenizer.token_to_id(image_token) is None:
            # transformers' Blip2Processor adds the token when the tokenizer lacks it
            from tokenizers import AddedToken

            tokenizer.add_special_tokens([AddedToken(image_token, normalized=False, special=True)])
        super().__init__(tokenizer, image_processor, image_token=image_token, **kwargs)
        self.num_query_tokens = num_query_tokens

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, padding_side: str = "left") -> "Blip2Processor":
        """A checkpoint folder: tokenizer.json, tokenizer_config.json, preprocessor_config.json and
        processor_config.json's num_query_tokens (else config.json's)."""
        path = Path(path)
        text = cls.read_text_side(path)
        text["chat_template"] = text["chat_template"] or BLIP2_PROMPT_TEMPLATE
        queries = read_json(path / "processor_config.json").get("num_query_tokens")
        if not isinstance(queries, int):
            queries = read_json(path / "config.json").get("num_query_tokens", DEFAULT_NUM_QUERY_TOKENS)
        return cls(padding_side=padding_side, image_processor=image_processor_if_any(path), num_query_tokens=queries,
                   **text)

    def __call__(self, text=None, images=None, *, output: str = "float32") -> dict:
        """text: a prompt or a list of B prompts (None: images only, for captioning with
        generate's default prompt); images: None, one image or a list of one image per prompt
        (a per-prompt list of one image is read too). output="uint8": pixel_values uint8
        (B, H, W, 3) for the fused patch embedding.

        Returns dict: input_ids int64 (B, Q + L), attention_mask int64 (B, Q + L) (the Q image
        tokens first, then the text padded on padding_side), pixel_values float32 (B, 3, H, W)."""
        if text is None and images is None:
            raise ValueError("text, images: expected at least one of the two")
        out = {}
        flat = None
        if images is not None:
            flat = [images] if is_image(images) else [i[0] if isinstance(i, (list, tuple)) and len(i) == 1 else i
                                                       for i in images]
            if not all(is_image(i) for i in flat):
                raise TypeError("images: expected an image or a list of one image per prompt")
            if self.image_processor is None:
                raise ValueError("images: this processor has no image processor (no preprocessor_config.json)")
            out["pixel_values"] = self.image_processor(flat, output=output).pixel_values
        if text is None:
            return out
        texts = self.texts(text)
        if flat is not None and len(flat) != len(texts):
            raise ValueError(f"images: expected one image per prompt ({len(texts)}), got {len(flat)}")
        input_ids, attention_mask = self.pad(self.encode(texts))
        if flat is not None:
            B, Q = len(texts), self.num_query_tokens
            image_ids = torch.full((B, Q), self.image_token_id, dtype=torch.int64)
            input_ids = torch.cat([image_ids, input_ids], dim=1)
            attention_mask = torch.cat([torch.ones(B, Q, dtype=torch.int64), attention_mask], dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}
