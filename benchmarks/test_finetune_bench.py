"""pytest-benchmark: one SmolVLM fine-tuning step (forward + backward + AdamW) of vlmfast against
transformers' SmolVLMForConditionalGeneration with labels, same random weights and batch
(SmolVLM2-256M dimensions, batch 2 x (one 512 x 512 image = 64 tokens + 100 text tokens), labels
on the last 30), CPU, float32 and bf16 autocast, with and without gradient checkpointing
(vlmfast also with checkpointing + AdamW in the backward). Each group holds vlmfast and
transformers for one (dtype, setting), measured in the same run; the step's peak memory
(vlmfast/bench/finetune.py: a fresh subprocess per side) goes into extra_info:

    pytest benchmarks/test_finetune_bench.py --benchmark-only --benchmark-enable

A full step takes seconds to tens of seconds on a 2-core machine: 3 rounds after one warm-up.
In the normal test run (--benchmark-disable) the model shrinks to the quick toy, so the module
only checks that every step runs and that both sides compute the same loss.
"""

import pytest
import torch

pytest.importorskip("transformers")

from vlmfast.bench import finetune, smolvlm  # noqa: E402

DTYPES = {"float32": torch.float32, "bf16-autocast": torch.bfloat16}


@pytest.fixture(scope="module")
def benchmarking(request):
    return not request.config.getoption("benchmark_disable", False)


@pytest.fixture(scope="module")
def spec(benchmarking):
    return smolvlm.FULL if benchmarking else smolvlm.QUICK


@pytest.fixture(scope="module")
def pair(spec):
    """(transformers, vlmfast) with the same weights, built once; each test trains copies."""
    return smolvlm.build_pair(spec, "cpu", torch.float32)


@pytest.fixture(scope="module")
def batch(spec, benchmarking):
    text, labels = ((finetune.TEXT_TOKENS, finetune.LABEL_TOKENS) if benchmarking
                    else (finetune.QUICK_TEXT_TOKENS, finetune.QUICK_LABEL_TOKENS))
    return finetune.make_batch(spec, finetune.BATCH["cpu"], text, labels)


@pytest.mark.parametrize("side", finetune.SIDES)
@pytest.mark.parametrize("setting", [*finetune.SETTINGS, finetune.IN_BACKWARD])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_train_step(benchmark, benchmarking, spec, pair, batch, side, setting, dtype_name):
    dtype = DTYPES[dtype_name]
    benchmark.group = f"smolvlm-train-step-cpu-{dtype_name}-{setting}-tokens{batch['input_ids'].numel()}"
    if setting == finetune.IN_BACKWARD and side == "transformers":
        pytest.skip("AdamW in the backward is measured for vlmfast only")
    model = finetune.build_side(side, spec, setting, "cpu", pair)
    optimizer = finetune.make_optimizer(model, setting)
    with torch.no_grad():
        before = finetune.loss_of(side, model, batch)
        # the same weights and batch: the other side's model gives the same loss
        peer = "transformers" if side == "vlmfast" else "vlmfast"
        expected = finetune.loss_of(peer, pair[0] if peer == "transformers" else pair[1], batch)
    torch.testing.assert_close(before, expected, rtol=1e-5, atol=1e-5)
    loss = benchmark.pedantic(finetune.train_step, args=(side, model, optimizer, batch, dtype),
                              rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.grad is None for p in model.parameters())  # the step leaves no gradient behind
    benchmark.extra_info["tokens_per_step"] = int(batch["input_ids"].numel())
    if benchmarking:
        memory = finetune.measure_in_subprocess(side, "full", setting, str(dtype).removeprefix("torch."), repeats=1)
        benchmark.extra_info.update(peak_mib=memory["peak_mib"], activation_mib=memory["activation_mib"])
