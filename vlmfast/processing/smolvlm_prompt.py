"""The text a SmolVLM / Idefics3 prompt carries for each image, from its tile grid (rows, cols).

Equal to transformers' SmolVLMProcessor (get_image_prompt_string): a split image becomes, per
tile in raster order, <fake><row_r_col_c> + image_seq_len x <image>, a newline after each row,
then "\n" <fake><global-img> + image_seq_len x <image> <fake>; an unsplit image (rows = cols = 0)
only the global part without the leading newline. image_seq_len is the number of vision tokens
per frame after pixel shuffle: (tile / patch)^2 / scale_factor^2 (64 for SmolVLM2-256M: 512 / 16
= 32, 32^2 / 4^2).
"""

from __future__ import annotations

from datetime import timedelta

from vlmfast.processing.number_words import number_words

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_TOKEN = "<global-img>"


def image_prompt(
    rows: int,
    cols: int,
    image_seq_len: int,
    *,
    fake_token: str = FAKE_TOKEN,
    image_token: str = IMAGE_TOKEN,
    global_token: str = GLOBAL_TOKEN,
) -> str:
    """The expanded text of one image with a rows x cols tile grid."""
    if min(rows, cols) < 0 or (rows == 0) != (cols == 0):
        raise ValueError(f"rows, cols: expected both 0 (not split) or both positive, got ({rows}, {cols})")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len: expected a positive int, got {image_seq_len}")
    tokens = image_token * image_seq_len
    global_part = f"{fake_token}{global_token}{tokens}{fake_token}"
    if rows == 0:
        return global_part
    grid = "".join(
        "".join(f"{fake_token}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n" for r in range(rows)
    )
    return f"{grid}\n{global_part}"


def expand_image_tokens(
    texts: list[str],
    rows: list[list[int]],
    cols: list[list[int]],
    image_seq_len: int,
    *,
    fake_token: str = FAKE_TOKEN,
    image_token: str = IMAGE_TOKEN,
    global_token: str = GLOBAL_TOKEN,
) -> list[str]:
    """Replace the i-th `image_token` of texts[b] by the prompt of image i of sample b.

    rows, cols: as ImageBatch.rows / .cols of the same batch (one list per sample).
    """
    if len(texts) != len(rows) or len(rows) != len(cols):
        raise ValueError(f"texts: expected one text per sample ({len(rows)} samples), got {len(texts)}")
    expanded = []
    for b, (text, sample_rows, sample_cols) in enumerate(zip(texts, rows, cols)):
        pieces = text.split(image_token)
        if len(pieces) - 1 != len(sample_rows):
            raise ValueError(
                f"texts[{b}]: expected {len(sample_rows)} {image_token} token(s), one per image of the sample, "
                f"got {len(pieces) - 1}"
            )
        out = [pieces[0]]
        for piece, r, c in zip(pieces[1:], sample_rows, sample_cols):
            out.append(
                image_prompt(
                    r, c, image_seq_len, fake_token=fake_token, image_token=image_token, global_token=global_token
                )
            )
            out.append(piece)
        expanded.append("".join(out))
    return expanded


# SmolVLM2's video prompt (transformers' SmolVLMProcessor.replace_video_token)
VIDEO_TOKEN = "<video>"
VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MEDIA_OUTRO = "\n\n"
DEFAULT_VIDEO_FPS = 24  # transformers' stand-in when a video's fps is unknown (it warns)


def video_prompt(
    frame_count: int,
    timestamps: list[float],
    duration: float | None,
    image_seq_len: int,
    *,
    fake_token: str = FAKE_TOKEN,
    image_token: str = IMAGE_TOKEN,
    global_token: str = GLOBAL_TOKEN,
) -> str:
    """The text a <video> becomes: an intro with the frame count in words and the duration as
    H:MM:SS (whole seconds; the last timestamp when the duration is unknown), then per frame
    "\\nFrame from MM:SS:" and one unsplit image's prompt, then a blank line.

    frame_count: what transformers writes, the frame count of the padded batch (the most frames
    of a video in the same call), not necessarily this video's own.
    """
    seconds = int(duration) if duration is not None else int(timestamps[-1])
    text = VIDEO_INTRO.format(frame_count=number_words(frame_count), video_duration=str(timedelta(seconds=seconds)))
    frame = image_prompt(0, 0, image_seq_len, fake_token=fake_token, image_token=image_token,
                         global_token=global_token)
    for second in timestamps:
        minutes, rest = int(second // 60), int(second % 60)
        text += FRAME_TIMESTAMP.format(timestamp=f"{minutes:02d}:{rest:02d}") + frame
    return text + MEDIA_OUTRO
