"""GPU-only checks of the Triton launchers (benchmarks/gpu_check.sh runs them; skipped without
CUDA): no register spills in what the launchers really compile (runtime specialisation, odd head
dims included), a tensor on a second GPU runs there, B * H = 65536 attention, the LCE kernels
at a language-model size against torch and with offsets past 2^31, and ops that CUDA graphs
capture without host syncs."""

import pytest
import torch
import torch.nn.functional as F

from vlmfast import ops
from vlmfast.kernels import _common, attention, linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def compiled(monkeypatch):
    """Every kernel the launchers compile during the test: (name, kwargs, CompiledKernel)."""
    seen = []
    launch = _common.launch

    def recording(kernel, grid, *args, **kwargs):
        result = launch(kernel, grid, *args, **kwargs)
        seen.append((_common.kernel_name(kernel), kwargs, result))
        return result

    monkeypatch.setattr(_common, "launch", recording)
    return seen


@pytest.mark.parametrize("head_dim", [40, 64, 72, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_kernels_do_not_spill_at_runtime(compiled, head_dim, dtype):
    """compile_all checks representative (aligned) shapes; here the GPU compiles the real ones,
    head dims whose strides are not multiples of 16 included, with bias and rotary."""
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    q = torch.randn(2, 4, 197, head_dim, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    cos, sin = ops.rope_2d(torch.stack(torch.meshgrid(torch.arange(14), torch.arange(15), indexing="ij"), -1)
                           .reshape(-1, 2)[:197].cuda(), head_dim // 4 * 4)
    mask = torch.rand(2, 1, 197, 197, device="cuda", generator=g) > 0.2
    mask[..., 0] = True
    for kwargs in ({}, {"attn_mask": mask}, {"rotary": (cos, sin), "is_causal": True}):
        out = ops.scaled_dot_product_attention(q, q, q, **kwargs)
        out.sum().backward()
    torch.cuda.synchronize()
    spilling = [(name, kw, k.n_spills) for name, kw, k in compiled if k is not None and k.n_spills]
    assert compiled and not spilling, spilling


def test_a_tensor_on_the_second_gpu_runs_there():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    q = torch.randn(1, 2, 33, 64, device="cuda:1", dtype=torch.bfloat16)
    out = ops.scaled_dot_product_attention(q, q, q, is_causal=True)
    expected = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
    assert out.device == torch.device("cuda", 1)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_attention_with_batch_times_heads_65536():
    """SigLIP-so400m's 16 heads at batch 4096: B * H = 65536 programs' worth of pairs, past the
    65535 a grid's axis 1 allows (the launchers put them on axis 0)."""
    q = torch.randn(4096, 16, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = ops.scaled_dot_product_attention(q, q, q)
    expected = F.scaled_dot_product_attention(q.float(), q.float(), q.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1024, 4096])
def test_linear_cross_entropy_at_language_model_size(n):
    """bf16 hidden (N, 2048) against a 32000-word head: loss and gradients against torch's
    materialised float32 computation, the LSE sweep split over the vocabulary."""
    g = torch.Generator(device="cuda").manual_seed(n)
    hidden = torch.randn(n, 2048, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(32000, 2048, device="cuda", generator=g) / 45).bfloat16()
    labels = torch.randint(0, 32000, (n,), device="cuda", generator=g)
    labels[::7] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = ops.linear_cross_entropy(h, w, labels)
    loss.backward()
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    expected = F.cross_entropy(h32 @ w32.T, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(h.grad.float(), h32.grad, atol=2e-3, rtol=3e-2)
    torch.testing.assert_close(w.grad.float(), w32.grad, atol=2e-3, rtol=3e-2)
    lse, _, _ = linear_cross_entropy.lse_pass(hidden, weight, None, labels, splits=1)
    lse_split, _, _ = linear_cross_entropy.lse_pass(hidden, weight, None, labels)
    torch.testing.assert_close(lse_split, lse, atol=1e-4, rtol=1e-5)


def test_linear_cross_entropy_offsets_past_two_to_the_31():
    """A (270000, 8192) head: row * stride of the weight passes 2^31 elements (int64 offsets in
    the kernels); the loss against torch on the same rows."""
    g = torch.Generator(device="cuda").manual_seed(31)
    weight = torch.randn(270_000, 8192, device="cuda", dtype=torch.bfloat16, generator=g) / 90
    hidden = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.tensor([0, 269_999, 200_000, 131_072] * 4, device="cuda")
    loss = ops.linear_cross_entropy(hidden, weight, labels)
    expected = F.cross_entropy((hidden.float() @ weight.float().T), labels)
    torch.testing.assert_close(loss, expected, atol=2e-3, rtol=2e-3)


def test_ops_capture_in_a_cuda_graph_without_host_syncs():
    """patch_embed with mean/std, attention_varlen and the LCE forward inside torch.cuda.graph:
    a host sync (a .item(), a .tolist(), a bool of a CUDA tensor) fails the capture."""
    images = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8, device="cuda")
    weight = torch.randn(64, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(40, 4, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device="cuda")
    hidden = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    head = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (64,), device="cuda")

    def step():
        return (ops.patch_embed(images, weight, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                ops.attention_varlen(q, q, q, cu, 25),
                ops.linear_cross_entropy(hidden, head, labels))

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)
