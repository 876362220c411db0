"""Instruction examples -> LLaVA and BLIP-2 training batches whose labels are the answers.

vlmfast.data.instruction_collate's method: the answers are located by rendering the chat template
turn by turn, the text is tokenised once with character offsets, and a token is labelled when it
starts inside an answer. Each answer ends with the tokenizer's EOS (LLaVA-1.5's training format,
"... ASSISTANT: answer</s>"; BLIP-2's captions likewise): added after the answer when the template
does not write it, so that the model learns to stop. Same truncation policy (an image is never
cut) and right padding.

LLaVA: each <image> becomes the processor's tokens_per_image tokens. BLIP-2: the prompt is the
conversation's text (Blip2Processor's template: user text, then the answer after a space) and the
num_query_tokens image tokens are put in front of every row with an image, as Blip2Processor does.
"""

from __future__ import annotations

import torch

from vlmfast.data.instruction_collate import EncodedExample, InstructionCollator, answer_spans
from vlmfast.processing.qwen2vl_instructions import expand_image_pads


def ended_answers(text: str, spans, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """text with `eos` written after every answer span that does not already end with it."""
    shift, out, moved = 0, text, []
    for start, end in spans:
        start, end = start + shift, end + shift
        if eos and not out[start:end].endswith(eos):
            out = out[:end] + eos + out[end:]
            end += len(eos)
            shift += len(eos)
        moved.append((start, end))
    return out, moved


class _AnswerCollator(InstructionCollator):
    """The shared steps; subclasses give the image token counts and the row prefix."""

    def __init__(self, processor, *, max_length: int | None = None):
        eos = processor.special_tokens.get("eos_token")
        if eos is None or processor.tokenizer.token_to_id(eos) is None:
            raise ValueError("processor: the tokenizer names no EOS token (tokenizer_config.json eos_token) to end "
                             "the answers with")
        processor.end_of_utterance_token = eos  # what answer_spans reads as the end of a turn
        super().__init__(processor, max_length=max_length)

    def _encode(self, example, counts: list[int], prefix: list[int]) -> EncodedExample:
        proc = self.processor
        text, spans = answer_spans(proc, list(example.messages), example.source)
        text, spans = ended_answers(text, spans, proc.end_of_utterance_token)
        if counts and text.count(proc.image_token) != len(counts):
            raise ValueError(f"{example.source}: images: {len(counts)} image(s) but the rendered conversation holds "
                             f"{text.count(proc.image_token)} {proc.image_token}")
        expanded, spans, image_spans = expand_image_pads(text, spans, counts, proc.image_token)
        return self.labelled(example, expanded, spans, image_spans, prefix)

    def _pixels(self, flat) -> dict:
        if not flat:
            return {}
        if self.processor.image_processor is None:
            raise ValueError("processor: has no image processor (no preprocessor_config.json) but the examples have "
                             "images")
        return {"pixel_values": self.processor.image_processor(flat).pixel_values}


class LlavaInstructionCollator(_AnswerCollator):
    """collator(examples) -> input_ids, attention_mask, labels int64 (B, L) (right padding) and,
    with images, pixel_values float32 (N, 3, H, W) in the order of their tokens. processor: a
    vlmfast LlavaProcessor."""

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: expected at least one example")
        proc = self.processor
        images = [example.load_images() for example in examples]
        flat = [image for sample in images for image in sample]
        extra = self._pixels(flat)
        per_image = 0
        if flat:
            H, W = extra["pixel_values"].shape[-2:]
            per_image = proc.tokens_per_image(H, W)
        encoded = [self._encode(e, [per_image] * len(s), []) for e, s in zip(examples, images)]
        return self.padded_batch(encoded, extra)


class Blip2InstructionCollator(_AnswerCollator):
    """collator(examples) -> input_ids, attention_mask, labels int64 (B, L) (the image tokens first
    in rows with an image, right padding) and pixel_values float32 (N, 3, H, W) for the N rows with
    an image. processor: a vlmfast Blip2Processor; one image per example at most."""

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: expected at least one example")
        proc = self.processor
        images = [example.load_images() for example in examples]
        for example, sample in zip(examples, images):
            if len(sample) > 1:
                raise ValueError(f"{example.source}: images: BLIP-2 takes one image per example, got {len(sample)}")
        extra = self._pixels([s[0] for s in images if s])
        prefix = [proc.image_token_id] * proc.num_query_tokens
        # the template writes no image placeholder: the image tokens are the row's prefix
        encoded = [self._encode(e, [], prefix if s else []) for e, s in zip(examples, images)]
        return self.padded_batch(encoded, extra)
