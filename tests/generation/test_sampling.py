"""Sampling: greedy is the argmax, temperature and top-p equal transformers' logits warpers,
sampled tokens stay in the nucleus, bad options raise ValueError naming the argument."""

import pytest
import torch

from vlmfast.generation.sampling import check_sampling, next_tokens, stop_token_tensor, top_k_filter, top_p_filter

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)


def _logits(batch=3, vocab=113, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999, 1.0])
def test_top_p_equals_transformers(top_p):
    logits = _logits()
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    torch.testing.assert_close(top_p_filter(logits, top_p), expected, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [1, 7, 112, 113, 500])
def test_top_k_equals_transformers(top_k):
    logits = _logits()
    logits[0, 3] = logits[0, 4]  # a tie at the boundary is kept by both
    expected = TopKLogitsWarper(top_k)(None, logits.clone())
    torch.testing.assert_close(top_k_filter(logits, top_k), expected, rtol=0, atol=0)
    assert top_k_filter(logits, 0) is logits and top_k_filter(logits, None) is logits


def test_temperature_then_top_p_keep_the_nucleus():
    logits = _logits(batch=4, vocab=97, seed=1)
    warped = TopPLogitsWarper(0.6)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    allowed = torch.isfinite(warped)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens = next_tokens(logits, do_sample=True, temperature=0.7, top_p=0.6, generator=g)
        assert allowed[torch.arange(4), tokens].all()


def test_greedy_is_argmax_first_on_ties():
    logits = _logits()
    logits[1, 5] = logits[1, 9] = logits[1].max() + 1
    tokens = next_tokens(logits)
    assert torch.equal(tokens, logits.argmax(-1)) and tokens[1] == 5


def test_sampling_is_reproducible_with_a_generator():
    logits = _logits(vocab=50)
    a = next_tokens(logits, do_sample=True, generator=torch.Generator().manual_seed(3))
    b = next_tokens(logits, do_sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # a tiny nucleus leaves only the most likely token
    assert torch.equal(next_tokens(logits, do_sample=True, top_p=1e-6), logits.argmax(-1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True, temperature=0.0, top_p=1.0), "temperature: expected a positive float"),
    (dict(do_sample=True, temperature=1.0, top_p=0.0), r"top_p: expected a float in \(0, 1\]"),
    (dict(do_sample=True, temperature=1.0, top_p=1.5), r"top_p: expected a float in \(0, 1\]"),
    (dict(do_sample=1, temperature=1.0, top_p=1.0), "do_sample: expected a bool"),
    (dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=-1), r"top_k: expected None or an int >= 0"),
])
def test_bad_sampling_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_sampling(**kwargs)


def test_stop_tokens():
    assert stop_token_tensor(None, "cpu") is None
    assert stop_token_tensor(7, "cpu").tolist() == [7]
    assert stop_token_tensor([7, 2], "cpu").tolist() == [7, 2]
    with pytest.raises(ValueError, match="eos_token_id: expected a token id or a list of token ids"):
        stop_token_tensor([1.5], "cpu")
