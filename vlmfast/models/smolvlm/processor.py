"""SmolVLM processor: chat template -> prompt text, <image> expanded from each image's tile grid,
tokenised with the checkpoint's tokenizer.json (`tokenizers` library, no transformers), batch
left-padded, images through the SmolVLM image processor.

    processor = SmolVLMProcessor.from_pretrained("path/to/SmolVLM2-256M-Video-Instruct")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)
    inputs = processor([text], [[image]])   # input_ids, attention_mask, pixel_values, pixel_attention_mask
    out = model.generate(**inputs, max_new_tokens=32)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

Videos (SmolVLM2) are sampled frames: `processor(text, videos=..., video_metadata=...)`, each
<video> of the text written out as transformers does (the frame count in words, the duration,
per frame its MM:SS timestamp and one unsplit image's tokens); see vlmfast.processing.video for
what a video may be.

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    inputs = processor([text], videos=[frames], video_metadata=[{"fps": 30}], do_sample_frames=True)

Equal to transformers' SmolVLMProcessor for the same checkpoint folder with padding_side "left"
(what batched generation needs); for videos up to the resampling of frames that need resizing
(vlmfast.processing.smolvlm_video).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vlmfast.processing.auto import image_processor_from_pretrained
from vlmfast.processing.batch import is_image, nested_images
from vlmfast.processing.smolvlm_prompt import (
    DEFAULT_VIDEO_FPS, FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, expand_image_tokens, video_prompt,
)
from vlmfast.processing.smolvlm_video import SmolVLMVideoProcessor
from vlmfast.processing.video import video_list

END_OF_UTTERANCE = "<end_of_utterance>"
DEFAULT_IMAGE_SEQ_LEN = 169  # transformers' SmolVLMProcessor default (Idefics3: 364 / 14 / 2 -> 13^2)
# The template transformers' SmolVLMProcessor renders a conversation with a video by (unless one
# is passed): messages as "Role: text", a ':' alone before a leading image or video, then
# <end_of_utterance>; "Assistant:" to prompt a reply.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _has_video(conversations) -> bool:
    return any(isinstance(part, dict) and part.get("type") == "video"
               for conversation in conversations if isinstance(conversation, (list, tuple))
               for message in conversation
               if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple))
               for part in message["content"])


def video_processor_from_pretrained(path: Path) -> SmolVLMVideoProcessor | None:
    """video_preprocessor_config.json, else preprocessor_config.json (where transformers looks),
    else None."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            return SmolVLMVideoProcessor(_read_json(path / name))
    return None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template, where transformers looks for it: chat_template.jinja,
    chat_template.json {"chat_template": ...}, processor_config.json, tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _read_json(path / name).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def read_image_seq_len(path: Path) -> int:
    """Image tokens per tile: processor_config.json's image_seq_len (what transformers' processor
    uses), else derived from config.json (tile / patch)^2 / scale_factor^2, else transformers' default."""
    value = _read_json(path / "processor_config.json").get("image_seq_len")
    if isinstance(value, int) and value > 0:
        return value
    model = _read_json(path / "config.json")
    vision = model.get("vision_config", {})
    if "image_size" in vision and "patch_size" in vision:
        return (vision["image_size"] // vision["patch_size"]) ** 2 // model.get("scale_factor", 2) ** 2
    return DEFAULT_IMAGE_SEQ_LEN


class SmolVLMProcessor:
    """texts (+ images) -> the inputs of SmolVLM.forward / generate; token ids -> text.

    tokenizer: a `tokenizers.Tokenizer` holding <image>, <fake_token_around_image>, <global-img>,
    <row_r_col_c> and <end_of_utterance> as added tokens; image_processor: a SmolVLMImageProcessor
    (None: text only); image_seq_len: <image> tokens per tile; pad_token: the padding token's text.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor=None, *, image_seq_len: int = DEFAULT_IMAGE_SEQ_LEN,
                 chat_template: str | None = None, pad_token: str | None = None,
                 special_tokens: dict[str, str] | None = None, padding_side: str = "left",
                 video_processor: SmolVLMVideoProcessor | None = None):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"image_seq_len: expected a positive int, got {image_seq_len!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.chat_template = chat_template
        self.padding_side = padding_side
        # bos/eos/pad/unk for the chat template, as transformers passes its special tokens map
        self.special_tokens = dict(special_tokens or {})
        self.image_token = self.special_tokens.get("image_token", IMAGE_TOKEN)
        self.fake_image_token = self.special_tokens.get("fake_image_token", FAKE_TOKEN)
        self.global_image_token = self.special_tokens.get("global_image_token", GLOBAL_TOKEN)
        self.end_of_utterance_token = self.special_tokens.get("end_of_utterance_token", END_OF_UTTERANCE)
        self.video_token = self.special_tokens.get("video_token", VIDEO_TOKEN)
        self.video_processor = video_processor
        self.image_token_id = tokenizer.token_to_id(self.image_token)
        if self.image_token_id is None:
            raise ValueError(f"tokenizer: the image token {self.image_token!r} is not in its vocabulary")
        self.pad_token = pad_token
        self.pad_token_id = tokenizer.token_to_id(pad_token) if pad_token else None
        self.end_of_utterance_id = tokenizer.token_to_id(self.end_of_utterance_token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, padding_side: str = "left") -> "SmolVLMProcessor":
        """A checkpoint folder: tokenizer.json, tokenizer_config.json (special tokens), the chat
        template, preprocessor_config.json (images) and processor_config.json (image_seq_len)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"path: expected tokenizer.json in {path} "
                                    "(slow-tokenizer-only checkpoints are not supported)")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        settings = _read_json(path / "tokenizer_config.json")
        special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(settings.get(name))
            if text is not None:
                special[name] = text
        extra = settings.get("extra_special_tokens") or {}
        if isinstance(extra, dict):  # transformers 5 names the multimodal tokens here
            special.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
        image_processor = None
        if (path / "preprocessor_config.json").is_file():
            image_processor = image_processor_from_pretrained(path)
        pad_token = special.get("pad_token")
        if pad_token is None:
            pad_id = _read_json(path / "config.json").get("text_config", {}).get("pad_token_id")
            pad_token = tokenizer.id_to_token(pad_id) if isinstance(pad_id, int) else None
        return cls(tokenizer, image_processor, image_seq_len=read_image_seq_len(path),
                   chat_template=read_chat_template(path), pad_token=pad_token, special_tokens=special,
                   padding_side=padding_side, video_processor=video_processor_from_pretrained(path))

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                            chat_template: str | None = None, **variables):
        """messages: one conversation [{"role", "content": str | [{"type": "image"} | {"type":
        "text", "text"}]}] -> its prompt text; a list of conversations -> a list of texts.
        Rendered with jinja2 as transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
        from vlmfast.models.smolvlm.chat_template import render_chat_template

        template = chat_template or self.chat_template
        batched = isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple))
        if chat_template is None and _has_video(messages if batched else [messages]):
            template = VIDEO_CHAT_TEMPLATE  # what transformers does for a conversation with a video
        if template is None:
            raise ValueError("chat_template: the checkpoint has none (chat_template.jinja / .json / "
                             "tokenizer_config.json); pass chat_template=")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages: expected a conversation (a non-empty list of {'role', 'content'} dicts) "
                            "or a list of conversations")
        batched = isinstance(messages[0], (list, tuple))
        conversations = messages if batched else [messages]
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        special = {k: v for k, v in self.special_tokens.items() if k in names}
        texts = [render_chat_template(template, list(c), add_generation_prompt=add_generation_prompt,
                                      **special, **variables) for c in conversations]
        return texts if batched else texts[0]

    # ------------------------------------------------------------------ encoding

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with the tokenizer's post-processor (as transformers'
        add_special_tokens=True)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(r) for r in rows)
        if any(len(r) != L for r in rows) and self.pad_token_id is None:
            raise ValueError("texts: of different lengths and the tokenizer has no pad_token to pad them with")
        ids = torch.full((len(rows), L), self.pad_token_id or 0, dtype=torch.int64)
        mask = torch.zeros((len(rows), L), dtype=torch.int64)
        for b, row in enumerate(rows):
            span = slice(L - len(row), L) if self.padding_side == "left" else slice(0, len(row))
            ids[b, span] = torch.tensor(row, dtype=torch.int64)
            mask[b, span] = 1
        return ids, mask

    def __call__(self, text, images=None, videos=None, *, video_metadata=None, do_sample_frames: bool | None = None,
                 max_frames: int | None = None, fps: float | None = None) -> dict[str, torch.Tensor]:
        """text: a prompt or a list of B prompts, each with one `<image>` per image of its sample.
        images: None; one image; a list of images (one sample); a list of B lists (a sample may
        be empty), as transformers reads them.
        videos: instead of images, one video or a list of videos, one per `<video>` of the texts
        in order (vlmfast.processing.video: frames, a uint8 (T, H, W, 3) array or a frame
        directory); video_metadata: one dict per video ({"fps", "duration", ...}), needed for
        sampling and true timestamps (without fps a video counts as 24 fps, as in transformers).
        do_sample_frames, max_frames, fps: override the checkpoint's video sampling.
        A sample's pixel_values hold the frames of its videos in order.

        Returns dict:
            input_ids       int64 (B, L), left-padded with pad_token_id
            attention_mask  int64 (B, L), 0 on padding
            pixel_values    float32 (B, N, 3, H, W)   (only with images or videos; N: the most tiles
                            or frames of a sample, all-zero padding frames)
            pixel_attention_mask int64 (B, N, H, W)   (only with images or videos)
        """
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text: expected a string or a non-empty list of strings")
        texts = list(texts)
        if videos is not None:
            if images is not None:
                raise ValueError("images, videos: expected one of the two per call (pixel_values hold either)")
            texts, out = self._videos(texts, videos, video_metadata, do_sample_frames, max_frames, fps)
        else:
            counts = [t.count(self.video_token) for t in texts]
            if any(counts):
                raise ValueError(f"videos: text has {counts} {self.video_token} token(s) per sample but no videos "
                                 "were given")
            texts, out = self._images(texts, images)
        input_ids, attention_mask = self._pad(self.encode(texts))
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def _images(self, texts, images):
        """texts with each <image> written out, and the image processor's outputs."""
        if images is None or (isinstance(images, (list, tuple)) and not is_image(images)
                              and all(isinstance(s, (list, tuple)) and not s for s in images)):
            counts = [t.count(self.image_token) for t in texts]
            if any(counts):
                raise ValueError(f"images: text has {counts} {self.image_token} token(s) per sample but no images "
                                 "were given")
            return texts, {}
        if self.image_processor is None:
            raise ValueError("images: this processor has no image processor (no preprocessor_config.json)")
        samples = nested_images(images)
        if len(samples) != len(texts):
            raise ValueError(f"images: expected one list of images per text ({len(texts)}), got {len(samples)} "
                             "(a flat list of images is ONE sample)")
        batch = self.image_processor(samples)
        texts = expand_image_tokens(texts, batch.rows, batch.cols, self.image_seq_len,
                                    fake_token=self.fake_image_token, image_token=self.image_token,
                                    global_token=self.global_image_token)
        return texts, batch.model_inputs()

    def _videos(self, texts, videos, video_metadata, do_sample_frames, max_frames, fps):
        """texts with each <video> written out, and the (B, N, ...) frames of each sample."""
        if self.video_processor is None:
            raise ValueError("videos: this processor has no video processor (no preprocessor_config.json)")
        videos = video_list(videos)
        counts = [t.count(self.video_token) for t in texts]
        if sum(counts) != len(videos):
            raise ValueError(f"videos: expected one video per {self.video_token} of the texts ({counts} per sample, "
                             f"{sum(counts)} in all), got {len(videos)}")
        if isinstance(video_metadata, dict):
            video_metadata = [video_metadata]
        batch = self.video_processor(videos, video_metadata, do_sample_frames=do_sample_frames,
                                     max_frames=max_frames, fps=fps)
        frame_count = batch.pixel_values.shape[1]  # transformers names the padded count in every prompt
        prompts = []
        for meta in batch.metadata:
            if meta.fps is None:
                meta.fps = DEFAULT_VIDEO_FPS
            prompts.append(video_prompt(frame_count, meta.timestamps, meta.duration, self.image_seq_len,
                                        fake_token=self.fake_image_token, image_token=self.image_token,
                                        global_token=self.global_image_token))
        prompts = iter(prompts)
        expanded = []
        for text in texts:
            pieces = text.split(self.video_token)
            expanded.append(pieces[0] + "".join(next(prompts) + piece for piece in pieces[1:]))

        if counts == [1] * len(texts):  # one video per sample: transformers' own layout
            return expanded, {"pixel_values": batch.pixel_values, "pixel_attention_mask": batch.pixel_attention_mask}
        # per sample: the real frames of its videos, in order, padded to the longest sample with
        # all-zero frames (mask 1 as transformers marks padding frames of a video)
        lengths = [len(meta.frames_indices) for meta in batch.metadata]
        owners = [b for b, c in enumerate(counts) for _ in range(c)]
        per_sample = [sum(n for n, o in zip(lengths, owners) if o == b) for b in range(len(texts))]
        N = max(per_sample)
        pixel_values = batch.pixel_values.new_zeros((len(texts), N, *batch.pixel_values.shape[2:]))
        pixel_mask = batch.pixel_attention_mask.new_ones((len(texts), N, *batch.pixel_attention_mask.shape[2:]))
        filled = [0] * len(texts)
        for v, (b, n) in enumerate(zip(owners, lengths)):
            pixel_values[b, filled[b]:filled[b] + n] = batch.pixel_values[v, :n]
            pixel_mask[b, filled[b]:filled[b] + n] = batch.pixel_attention_mask[v, :n]
            filled[b] += n
        return expanded, {"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}

    # ------------------------------------------------------------------ decoding

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
        """ids: int (B, T) tensor or a list of lists."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode_batch([list(r) for r in ids], skip_special_tokens=skip_special_tokens)
