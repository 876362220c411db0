"""Instruction examples -> a Qwen2-VL training batch whose labels are the assistant's answers.

vlmfast.data.instruction_collate's method with Qwen2-VL's prompt: the answers are located by
rendering the chat template turn by turn (answer text + <|im_end|>), each <|image_pad|> is
written out as its image's t*h*w/4 tokens, the text is tokenised once with offsets, and a token is
labelled when it starts inside an answer. Same truncation policy (an image is never cut) and
right padding.
"""

from __future__ import annotations

import torch

from vlmfast.data.instruction_collate import EncodedExample, InstructionCollator, answer_spans


def expand_image_pads(text: str, spans, counts: list[int], token: str):
    """text with its k-th `token` written out counts[k] times. Returns (expanded text, the answer
    spans moved to it, the character spans of the images' tokens)."""
    pieces = text.split(token)
    out, images, shifts = [pieces[0]], [], []
    original, expanded = len(pieces[0]), len(pieces[0])
    for piece, count in zip(pieces[1:], counts):
        images.append((expanded, expanded + count * len(token)))
        shifts.append((original, (count - 1) * len(token)))
        out += [token * count, piece]
        original += len(token) + len(piece)
        expanded += count * len(token) + len(piece)

    def moved(x: int) -> int:
        return x + sum(delta for at, delta in shifts if at < x)

    return "".join(out), [(moved(a), moved(b)) for a, b in spans], images


class Qwen2VLInstructionCollator(InstructionCollator):
    """collator(examples) -> dict of tensors for Qwen2VL.loss:

        input_ids       int64 (B, L)  right-padded with the pad token
        attention_mask  int64 (B, L)  0 on padding
        labels          int64 (B, L)  token ids on the answers (and their <|im_end|>), -100 elsewhere
        pixel_values    float32 (sum of h * w patches, C * tp * p * p)   (only with images)
        image_grid_thw  int64 (n_images, 3)                             (only with images)

    processor: vlmfast's Qwen2VLProcessor; max_length: None or the most tokens of an example.
    """

    def encode(self, example, counts: list[int]) -> EncodedExample:
        """One example's tokens and labels; counts: its images' token counts, in order."""
        proc = self.processor
        text, spans = answer_spans(proc, list(example.messages), example.source)
        if text.count(proc.image_token) != len(counts):
            raise ValueError(f"{example.source}: images: {len(counts)} image(s) but the rendered conversation holds "
                             f"{text.count(proc.image_token)} {proc.image_token}")
        expanded, spans, image_spans = expand_image_pads(text, spans, counts, proc.image_token)
        return self.labelled(example, expanded, spans, image_spans)

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: expected at least one example")
        proc = self.processor
        images = [example.load_images() for example in examples]
        out, counts = {}, [[] for _ in examples]
        flat = [image for sample in images for image in sample]
        if flat:
            batch = proc.image_processor(flat)
            tokens = iter((batch.image_grid_thw.prod(-1) // proc.image_processor.merge_size**2).tolist())
            counts = [[next(tokens) for _ in sample] for sample in images]
            out.update(batch.model_inputs())
        return self.padded_batch([self.encode(e, c) for e, c in zip(examples, counts)], out)
