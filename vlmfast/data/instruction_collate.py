"""Instruction examples -> a SmolVLM training batch whose labels are the assistant's answers.

How the answers are found: for the i-th message, an assistant turn, the conversation up to it is
rendered with the generation prompt (P, ends with "Assistant:") and up to and including it (T).
T must extend P (the template renders turn by turn, as SmolVLM's does); the answer span is
T[len(P):] up to and including the end-of-turn token (<end_of_utterance> for SmolVLM; the newline
the template writes after it is not learnt: generation stops at the token). The full conversation
is then expanded (each <image> becomes its tile prompt) and tokenised once with character offsets,
and a token is labelled when it starts inside an answer span. Tokenising once keeps the ids
exactly those of inference; the offsets tell which tokens belong to which part.

Truncation policy (max_length): a too-long example is cut at the end when every image token and
at least one answer token lie before the cut; otherwise ValueError naming the example (file:line):
an image is never cut and an example is never dropped silently.

Padding is on the right (labels -100, attention 0): the positions of a row's tokens are then
0..n-1 whatever the batch, as in transformers' training forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmfast.data.instructions import InstructionExample
from vlmfast.processing.smolvlm_prompt import image_prompt

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    """input_ids and labels (equal lengths, labels -100 outside the answers) of one example."""

    input_ids: list[int]
    labels: list[int]


def _render_prefix(processor, messages: list[dict]) -> str:
    """The conversation so far plus the generation prompt; also for no messages at all (an
    answer first), which processor.apply_chat_template refuses."""
    if messages:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    from vlmfast.models.smolvlm.chat_template import render_chat_template

    special = {k: v for k, v in processor.special_tokens.items() if k in ("bos_token", "eos_token", "pad_token",
                                                                          "unk_token")}
    return render_chat_template(processor.chat_template, [], add_generation_prompt=True, **special)


def answer_spans(processor, messages: list[dict], source: str = "messages") -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text (images as <image>) and the [start, end) character spans of its
    assistant answers (answer text + end-of-turn token)."""
    full = processor.apply_chat_template(messages)
    eot = processor.end_of_utterance_token
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_prefix(processor, messages[:i])
        upto = processor.apply_chat_template(messages[: i + 1])
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(f"{source}: messages[{i}]: the chat template does not render the conversation turn by "
                             "turn (a prefix rendering is not a prefix), so the answer cannot be located")
        tail = upto[len(prompt):]
        at = tail.find(eot) if eot else -1
        end = len(prompt) + (at + len(eot) if at >= 0 else len(tail.rstrip()))
        spans.append((len(prompt), end))
    return full, spans


def _expand(text: str, spans, rows, cols, processor) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """Replaces each <image> of text by its tile prompt. Returns the expanded text, the answer spans
    moved to it, and the character spans of the image prompts."""
    pieces = text.split(processor.image_token)
    out, shift, images, starts = [pieces[0]], 0, [], []
    position = len(pieces[0])  # in the original text
    for piece, r, c in zip(pieces[1:], rows, cols):
        prompt = image_prompt(r, c, processor.image_seq_len, fake_token=processor.fake_image_token,
                              image_token=processor.image_token, global_token=processor.global_image_token)
        start = position + shift
        images.append((start, start + len(prompt)))
        starts.append((position, len(prompt) - len(processor.image_token)))
        shift += len(prompt) - len(processor.image_token)
        position += len(processor.image_token) + len(piece)
        out += [prompt, piece]

    def moved(x: int) -> int:
        return x + sum(delta for at, delta in starts if at < x)

    return "".join(out), [(moved(a), moved(b)) for a, b in spans], images


class InstructionCollator:
    """collator(examples) -> dict of tensors for SmolVLM.loss:

        input_ids             int64 (B, L)  right-padded with the pad token
        attention_mask        int64 (B, L)  0 on padding
        labels                int64 (B, L)  token ids on the answers, -100 elsewhere
        pixel_values          float32 (B, N, 3, H, W)  (only when a sample has images)
        pixel_attention_mask  int64 (B, N, H, W)       (only when a sample has images)

    processor: vlmfast's SmolVLMProcessor; max_length: None or the most tokens of an example.
    """

    def __init__(self, processor, *, max_length: int | None = None):
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length: expected None or an int >= 2, got {max_length!r}")
        if processor.chat_template is None:
            raise ValueError("processor: the checkpoint has no chat template (chat_template.jinja / .json)")
        if processor.pad_token_id is None:
            raise ValueError("processor: the tokenizer has no pad token to pad batches with")
        self.processor, self.max_length = processor, max_length

    def encode(self, example: InstructionExample, rows: list[int], cols: list[int]) -> EncodedExample:
        """One example's tokens and labels; rows/cols: its images' tile grids (ImageBatch)."""
        proc = self.processor
        text, spans = answer_spans(proc, list(example.messages), example.source)
        if text.count(proc.image_token) != len(rows):
            raise ValueError(f"{example.source}: images: {len(rows)} image(s) but the rendered conversation holds "
                             f"{text.count(proc.image_token)} {proc.image_token}")
        expanded, spans, image_spans = _expand(text, spans, rows, cols, proc)
        return self.labelled(example, expanded, spans, image_spans)

    def labelled(self, example, text: str, spans, image_spans, prefix: list[int] | None = None) -> EncodedExample:
        """text (images written out) tokenised once with offsets, after the token ids `prefix`
        (images put in front of the row, BLIP-2); a token is labelled when it starts inside an
        answer span (`spans`, characters of text). Cut at max_length, never inside the image
        tokens (`image_spans`, or the prefix)."""
        prefix = prefix or []
        encoding = self.processor.tokenizer.encode(text, add_special_tokens=True)
        ids = prefix + list(encoding.ids)
        labels = [IGNORE_INDEX] * len(ids)
        image_end = len(prefix)  # tokens up to here hold image prompts: never cut
        for t, (start, end) in enumerate(encoding.offsets, len(prefix)):
            if end > start and any(a <= start < b for a, b in spans):
                labels[t] = ids[t]
            if end > start and any(a <= start < b for a, b in image_spans):
                image_end = t + 1
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = self._truncate(example, ids, labels, image_end)
        return EncodedExample(ids, labels)

    def _truncate(self, example, ids, labels, image_end):
        cut = self.max_length
        if image_end > cut:
            raise ValueError(f"{example.source}: {len(ids)} tokens, more than max_length={cut}, and its image tokens "
                             f"end at token {image_end}: an image is never cut; raise max_length or shorten the "
                             "example")
        if all(label == IGNORE_INDEX for label in labels[:cut]):
            raise ValueError(f"{example.source}: {len(ids)} tokens, more than max_length={cut}, and no answer token "
                             "lies before the cut; raise max_length or shorten the example")
        return ids[:cut], labels[:cut]

    def __call__(self, examples: list[InstructionExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: expected at least one example")
        proc = self.processor
        images = [example.load_images() for example in examples]
        out = {}
        if any(images):
            if proc.image_processor is None:
                raise ValueError("processor: has no image processor (no preprocessor_config.json) but the examples "
                                 "have images")
            batch = proc.image_processor(images)
            rows, cols = batch.rows, batch.cols
            out.update(batch.model_inputs())
        else:
            rows = cols = [[] for _ in examples]
        return self.padded_batch([self.encode(e, r, c) for e, r, c in zip(examples, rows, cols)], out)

    def padded_batch(self, encoded: list[EncodedExample], extra: dict) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels (B, L) of the encoded examples, right-padded (the
        pad token, attention 0, labels -100), and the `extra` tensors (the images')."""
        L = max(len(e.input_ids) for e in encoded)
        input_ids = torch.full((len(encoded), L), self.processor.pad_token_id, dtype=torch.int64)
        labels = torch.full((len(encoded), L), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((len(encoded), L), dtype=torch.int64)
        for b, e in enumerate(encoded):
            n = len(e.input_ids)
            input_ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.int64)
            labels[b, :n] = torch.tensor(e.labels, dtype=torch.int64)
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra}
