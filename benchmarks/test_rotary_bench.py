"""pytest-benchmark: rotary embedding on the CPU, vlmfast vs its reference vs transformers.

    pytest benchmarks/test_rotary_bench.py --benchmark-only --benchmark-enable
"""

import pytest
import torch

from vlmfast import ops

SHAPE = (8 * 197, 12, 64)  # a ViT-B/16 batch of 8: (tokens, heads, head_dim)


@pytest.fixture(scope="module")
def inputs():
    x = torch.randn(SHAPE)
    positions = torch.stack((torch.arange(SHAPE[0]) // 40, torch.arange(SHAPE[0]) % 40), 1)
    cos, sin = ops.rope_2d(positions, SHAPE[-1])
    return x, cos, sin


def test_vlmfast(benchmark, inputs):
    x, cos, sin = inputs
    out = benchmark(ops.apply_rotary_emb, x, cos, sin, seq_dim=0)
    torch.testing.assert_close(out, ops.reference.apply_rotary_emb(x, cos, sin, False, 0))


def test_reference(benchmark, inputs):
    x, cos, sin = inputs
    benchmark(ops.reference.apply_rotary_emb, x, cos, sin, False, 0)


def test_transformers_unfused(benchmark, inputs):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    x, cos, sin = inputs
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    benchmark(apply_rotary_pos_emb_vision, x, x, full_cos, full_sin)
