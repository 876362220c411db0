"""The image prompt text against transformers' SmolVLM get_image_prompt_string."""

import pytest

from tests.processing.synthetic import photo
from vlmfast.processing import SmolVLMImageProcessor
from vlmfast.processing.smolvlm_prompt import expand_image_tokens, image_prompt

from tests.processing.oracle import transformers  # noqa: F401  (skips without transformers)
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string  # noqa: E402

TOKENS = dict(fake_token_around_image="<fake_token_around_image>", image_token="<image>", global_image_token="<global-img>")


@pytest.mark.parametrize("rows, cols", [(0, 0), (1, 1), (1, 3), (4, 2), (3, 3)])
@pytest.mark.parametrize("seq_len", [1, 64, 81])
def test_equals_transformers(rows, cols, seq_len):
    assert image_prompt(rows, cols, seq_len) == get_image_prompt_string(rows, cols, seq_len, **TOKENS)


def test_expand_from_a_processed_batch():
    batch = SmolVLMImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})(
        [[photo(90, 160, 0), photo(64, 64, 1)], [photo(300, 40, 2)]]
    )
    texts = ["User:<image>Compare with<image>.", "<image>What is this?"]
    got = expand_image_tokens(texts, batch.rows, batch.cols, 64)
    first = [get_image_prompt_string(r, c, 64, **TOKENS) for r, c in zip(batch.rows[0], batch.cols[0])]
    second = get_image_prompt_string(batch.rows[1][0], batch.cols[1][0], 64, **TOKENS)
    assert got == [f"User:{first[0]}Compare with{first[1]}.", f"{second}What is this?"]
    assert batch.rows == [[2, 2], [2]] and batch.cols == [[2, 2], [1]]


def test_bad_input():
    with pytest.raises(ValueError, match=r"texts\[1\]: expected 1 <image> token\(s\), one per image of the sample, got 2"):
        expand_image_tokens(["<image>", "<image><image>"], [[0], [1]], [[0], [1]], 4)
    with pytest.raises(ValueError, match=r"texts: expected one text per sample \(2 samples\), got 1"):
        expand_image_tokens(["<image>"], [[0], [1]], [[0], [1]], 4)
    with pytest.raises(ValueError, match=r"rows, cols: expected both 0 \(not split\) or both positive, got \(0, 2\)"):
        image_prompt(0, 2, 4)
