"""vlmfast/bench/smolvlm.py runs end to end (quick shapes) and both implementations agree."""

import pytest
import torch

pytest.importorskip("transformers")


def test_smolvlm_benchmark_quick_runs():
    from vlmfast.bench.smolvlm import run

    results = run(torch.device("cpu"), torch.float32, quick=True)
    assert [r.case.split(" ")[0] for r in results] == ["prefill", "memory:", "generate", "prefill", "decode", "decode"]
    for r in results:
        assert r.suite == "smolvlm" and r.ms > 0 and r.peer == "transformers" and r.peer_ms > 0
    memory = results[1]
    assert memory.peak_mib > memory.extra["baseline_mib"] > 0 and memory.extra["peer_peak_mib"] > 0
    assert memory.extra["greedy_equal"] is True
    for r in results[2:3] + results[4:]:  # generate and decode rows (the tiled prefill has no tokens)
        assert r.extra["greedy_equal"] is True and r.extra["tokens_per_s"] > 0
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from vlmfast.bench.decode_case import decoder_weight_bytes
    from vlmfast.bench.smolvlm import QUICK

    streamed = decoder_weight_bytes(SmolVLMForConditionalGeneration(SmolVLMConfig(**QUICK)))
    for r in results[4:]:  # decode: GB/s = the decoder's weight bytes per step over our step
        assert r.gbps * r.ms * 1e6 == pytest.approx(streamed)
