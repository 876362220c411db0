"""The launchers' launch arithmetic, without a GPU: grids within CUDA's limits at the sizes that
break a naive grid (B * H = 65536 on axis 1), the device guard around every launch, and the
splits of the LCE log-sum-exp sweep and of flash-decoding."""

import contextlib

import pytest
import torch
import triton

from vlmfast.kernels import _common, attention, contrastive, linear_cross_entropy, patch_embed, rotary

# SigLIP-so400m (16 heads, 729 tokens) at batch 4096: B * H = 65536, one past axis 1's limit.
SIGLIP_PAIRS = 4096 * 16


def test_check_grid_limits():
    assert _common.check_grid((2**31 - 1, 65535, 65535), "k") == (2**31 - 1, 65535, 65535)
    for grid in ((2**31,), (1, 65536), (1, 1, 65536)):
        with pytest.raises(ValueError, match=r"k: launch grid .* exceeds CUDA's limits"):
            _common.check_grid(grid, "k")


def test_attention_grids_hold_batch_times_heads_on_axis_0():
    """(query blocks x B * H,) on axis 0: B * H = 65536 fits, and so does the largest case a
    1-D grid can hold; the old (blocks, B * H) layout would not have."""
    assert not _common.grid_ok((triton.cdiv(729, 128), SIGLIP_PAIRS))  # the old layout
    for blocks in (1, triton.cdiv(729, 16), triton.cdiv(729, 128), triton.cdiv(32768, 64)):
        grid = attention.blocks_grid(blocks, SIGLIP_PAIRS)
        assert grid == (blocks * SIGLIP_PAIRS,) and _common.grid_ok(grid)
    assert _common.grid_ok(attention.blocks_grid(32767, 65536))  # 2^31 - 2^16 programs: fits
    assert not _common.grid_ok(attention.blocks_grid(32768, 65536))  # 2^31: launch() raises, no wrong grid
    # decode: splits x (batch, kv head) pairs, the combine one program per query row
    splits, chunk = attention.decode_split(4096, 64, SIGLIP_PAIRS, 2 * 132)
    assert splits == 1 and chunk >= 4096 and _common.grid_ok(attention.blocks_grid(splits, SIGLIP_PAIRS))


@pytest.mark.parametrize("keys, block_n, pairs", [(1, 16, 1), (130, 64, 2), (4096, 64, 8), (100_000, 32, 3)])
def test_decode_split_covers_every_key_once(keys, block_n, pairs):
    splits, chunk = attention.decode_split(keys, block_n, pairs, 2 * 132)
    assert chunk % block_n == 0 and (splits - 1) * chunk < keys <= splits * chunk
    assert splits * pairs <= max(2 * 132, pairs)  # about two programs per SM, never more splits than needed


def test_other_grids_at_large_sizes():
    rows = 2**24  # 16M rows (tokens, patches, pairs)
    for grid in (linear_cross_entropy.lse_grid(rows, 16, 64), linear_cross_entropy.grad_grid(rows, 65536, 16, 32),
                 contrastive.rows_grid(rows, 16), contrastive.grad_grid(rows, 4096, 16, 64),
                 patch_embed.gemm_grid(rows, 4096, 32, 32), patch_embed.gather_grid(rows, 3 * 32 * 32),
                 rotary.rows_grid(rows * 16, 1)):
        assert _common.grid_ok(grid), grid


@pytest.mark.parametrize("n, vocab, block_m, block_n", [(1, 1, 16, 32), (2048, 151_936, 128, 64), (7, 97, 16, 32),
                                                         (65536, 32000, 128, 64), (300, 130, 16, 32)])
def test_lse_split_covers_the_vocabulary(n, vocab, block_m, block_n):
    """Row blocks x splits reach about the requested programs (N = 2048 on 132 SMs: 16 row
    blocks alone would leave most SMs idle); spans are whole blocks and cover V exactly."""
    splits, span = linear_cross_entropy.lse_split(n, vocab, block_m, block_n, 2 * 132)
    assert span % block_n == 0 and (splits - 1) * span < vocab <= splits * span
    row_blocks = triton.cdiv(n, block_m)
    if vocab >= 4 * block_n * 264:
        assert row_blocks * splits >= 2 * 132 or splits * 4 * block_n >= vocab
    assert span >= min(vocab, 4 * block_n) or splits == 1


def test_launch_enters_the_device_guard_of_its_first_tensor(monkeypatch):
    """A CUDA tensor launches under torch.cuda.device(tensor.device): on cuda:1 it runs on cuda:1
    (Triton launches on the current device). No GPU here: the guard is recorded."""
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

        @property
        def device(self):
            return torch.device("cuda", 1)

    with _common.device_guard(torch.empty(1).as_subclass(FakeCuda)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.empty(1)):  # a CPU tensor: no guard
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_launch_goes_through_the_guard(monkeypatch):
    """Run each launcher once (interpreter, CPU tensors): every kernel launch passed through
    _common.device_guard with one of its tensors."""
    guarded = []
    original = _common.device_guard
    monkeypatch.setattr(_common, "device_guard", lambda t: guarded.append(t.device) or original(t))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 16, generator=g)
    out, lse = attention.forward(q, q, q, scale=0.25, is_causal=True)
    attention.backward(torch.randn(out.shape, generator=g), q, q, q, out, lse, scale=0.25, is_causal=True)
    hidden, weight = torch.randn(3, 16, generator=g), torch.randn(40, 16, generator=g)
    linear_cross_entropy.forward(hidden, weight, None, torch.tensor([1, 2, 3]), -100, 0.0, torch.ones(3))
    x = torch.randn(4, 16, generator=g)
    contrastive.infonce_forward(x, x, torch.tensor(2.0))
    cos, sin = rotary.rope_2d(torch.tensor([[0, 1], [2, 3]]), torch.ones(4))
    rotary.forward(torch.randn(1, 2, 16, generator=g), cos, sin, False, False, 1)
    images = torch.randint(0, 255, (1, 4, 4, 3), dtype=torch.uint8, generator=g)
    patch_embed.forward(images, torch.randn(8, 3, 2, 2, generator=g), None, torch.ones(3), torch.zeros(3))
    assert len(guarded) >= 9 and all(d.type == "cpu" for d in guarded)


def test_tuning_keeps_the_fastest_candidate_that_does_not_spill(monkeypatch):
    """VLMFAST_TUNE=1 on a GPU: each candidate runs, the fastest one that does not spill is kept
    per key and reused; without it (or under the interpreter) the table's first is taken."""
    import time
    import types

    candidates = [dict(BLOCK_M=64), dict(BLOCK_M=32), dict(BLOCK_M=16)]
    cost = {64: 0.004, 32: 0.001, 16: 0.0001}  # the 16-row tile is fastest but spills
    runs = []

    def run(config):
        runs.append(config["BLOCK_M"])
        time.sleep(cost[config["BLOCK_M"]])
        return types.SimpleNamespace(n_spills=64 if config["BLOCK_M"] == 16 else 0)

    assert _common.choose("k", ("a",), candidates, run) is candidates[0] and not runs  # not tuning
    monkeypatch.setattr(_common, "TUNE", True)
    monkeypatch.setattr(_common, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(_common, "_tuned", {})
    assert _common.choose("k", ("a",), candidates, run) is candidates[1]
    assert set(runs) == {64, 32, 16}
    runs.clear()
    assert _common.choose("k", ("a",), candidates, run) is candidates[1] and not runs  # kept per key
