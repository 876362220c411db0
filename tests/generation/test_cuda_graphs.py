"""CUDA graphs for the decode step (vlmfast/generation/cuda_graphs.py).

On the CPU: the decision to use graphs (CUDA only, a keyword turns it off, never with a custom
decode_step), that generate() on the CPU never builds one, the static-buffer bookkeeping, and
the fallback when capture fails (here it always does: no CUDA), which must still give the eager
tokens. On a GPU (benchmarks/gpu_check.sh runs it): graph-replayed greedy generation equals the
eager one token for token, and a second call reuses the captured graph.
"""

import warnings

import pytest
import torch

from tests.models.smolvlm_helpers import build_batch, tiny_model
from vlmfast.generation import cuda_graphs

ROWS = [(5, 3, 4, None), (1, 7, 2, None), (0, 6, 0, None)]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


class _NoStaticStep:
    pass


def test_graphs_wanted_only_on_cuda_when_enabled(model):
    cuda = torch.device("cuda")
    assert cuda_graphs.wanted(model, cuda, enabled=True)
    assert not cuda_graphs.wanted(model, cuda, enabled=False)
    assert not cuda_graphs.wanted(model, torch.device("cpu"), enabled=True)
    assert not cuda_graphs.wanted(model, cuda, enabled=True, decode_step=model.decode_step)
    assert not cuda_graphs.wanted(_NoStaticStep(), cuda, enabled=True)


def test_cpu_generate_never_builds_a_graph(model):
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=1)
    model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=3, eos_token_id=[])
    assert getattr(model, "_graphed_decode_step", None) is None


def test_static_buffers_bookkeeping(model):
    cache = model.new_cache(3, 12)
    step = cuda_graphs.GraphedDecodeStep(model, cache)
    cache.advance(5)
    tokens, positions = torch.tensor([4, 9, 2]), torch.tensor([7, 3, 5])
    pointers = [t.data_ptr() for t in (step.tokens, step.positions, step.slot)]
    step.load_inputs(tokens, positions, cache)
    assert torch.equal(step.tokens, tokens) and torch.equal(step.positions, positions)
    assert step.slot.tolist() == [5]
    assert [t.data_ptr() for t in (step.tokens, step.positions, step.slot)] == pointers  # in place
    with pytest.raises(ValueError, match="cache: expected the StaticKVCache this decode graph"):
        step.load_inputs(tokens, positions, model.new_cache(3, 12))
    with pytest.raises(ValueError, match=r"tokens, positions: expected \(3,\) each"):
        step.load_inputs(tokens[:2], positions[:2], cache)
    cache.advance(7)
    with pytest.raises(ValueError, match="cache: full"):
        step.load_inputs(tokens, positions, cache)


def test_step_and_cache_are_reused_for_the_same_shape(model):
    cache = model.new_cache(3, 12)
    step = cuda_graphs.decode_step_for(model, cache)
    try:
        assert cuda_graphs.decode_step_for(model, cache) is step
        assert cuda_graphs.reusable_cache(model, 3, 12) is cache
        assert cuda_graphs.reusable_cache(model, 3, 13) is None
        assert cuda_graphs.reusable_cache(model, 2, 12) is None
        other = model.new_cache(3, 12)
        assert cuda_graphs.decode_step_for(model, other) is not step
    finally:
        model._graphed_decode_step = None


def test_failed_capture_warns_once_and_decodes_eagerly(model, monkeypatch):
    """Capture needs CUDA: on CPU tensors it fails, and the step must fall back to the eager
    static step with the same tokens as static_shapes=True."""
    monkeypatch.setattr(cuda_graphs, "_warned", False)
    ids, mask, pixels, pixel_mask = build_batch(ROWS, seed=4)
    B, L = ids.shape
    expected = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[], static_shapes=True)
    cache = model.new_cache(B, L + 5)
    step = cuda_graphs.GraphedDecodeStep(model, cache)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the decode step failed"):
        out = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[], cache=cache,
                             decode_step=step)
    assert step.failed and step.graph is None and step.replays == 0
    assert torch.equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process: not again
        again = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=5, eos_token_id=[], cache=cache,
                               decode_step=cuda_graphs.GraphedDecodeStep(model, cache))
    assert torch.equal(again, expected)


class _DeviceRecorder:
    """Stands in for torch.cuda.device: records the device of each `with` and what ran inside."""

    def __init__(self, log):
        self.log = log

    def __call__(self, device):
        recorder = self

        class _Guard:
            def __enter__(self):
                recorder.log.append(("enter", torch.device(device)))

            def __exit__(self, *exc):
                recorder.log.append(("exit", torch.device(device)))
                return False

        return _Guard()


def test_capture_and_replay_run_on_the_cache_device(monkeypatch):
    """A cache on cuda:1 is captured and replayed with cuda:1 current (Triton launches, the side
    stream and the graph pool follow the current device). No GPU here: the guard is recorded."""
    log = []
    monkeypatch.setattr(torch.cuda, "device", _DeviceRecorder(log))
    cache = type("Cache", (), {"device": torch.device("cuda", 1), "length": 0, "advance": lambda self, n: None})()
    step = object.__new__(cuda_graphs.GraphedDecodeStep)
    step.cache, step.graph, step.failed, step.replays, step.logits = cache, None, False, 0, None

    def capture():
        log.append(("capture", None))
        return "graph", "logits"

    monkeypatch.setattr(step, "_warm_up_and_capture", capture)
    step._capture()
    assert log == [("enter", torch.device("cuda", 1)), ("capture", None), ("exit", torch.device("cuda", 1))]
    assert (step.graph, step.logits) == ("graph", "logits")

    log.clear()
    step.graph = type("Graph", (), {"replay": lambda self: log.append(("replay", None))})()
    monkeypatch.setattr(step, "load_inputs", lambda *args: None)
    step(None, None, cache)
    assert log == [("enter", torch.device("cuda", 1)), ("replay", None), ("exit", torch.device("cuda", 1))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_greedy_generation_equals_eager():
    model = tiny_model(seed=3).to("cuda")
    ids, mask, pixels, pixel_mask = (t.to("cuda") for t in build_batch(ROWS, seed=2))
    # The eager run of the very function the graph captures (decode_step_static).
    eager = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=8, eos_token_id=[], cuda_graphs=False,
                           static_shapes=True)
    assert getattr(model, "_graphed_decode_step", None) is None
    graphed = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=8, eos_token_id=[])
    step = model._graphed_decode_step
    assert not step.failed and step.graph is not None and step.replays == 7
    assert torch.equal(graphed, eager)
    # Same shapes again: the cache and its graph are reused (no new capture), same tokens.
    graph = step.graph
    again = model.generate(ids, pixels, pixel_mask, mask, max_new_tokens=8, eos_token_id=[])
    assert model._graphed_decode_step is step and step.graph is graph and step.replays == 14
    assert torch.equal(again, eager)
