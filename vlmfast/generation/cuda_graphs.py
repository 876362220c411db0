"""CUDA graphs for the decode step: capture model.decode_step_static once, replay it per token.

A decode step of a small VLM is hundreds of short kernels; on a GPU their launches, not their
math, set the speed. model.decode_step_static (vlmfast/models/smolvlm/model.py) has shapes and
Python control flow that do not depend on the step: it reads its inputs from three static
buffers (tokens (B,), positions (B,), slot (1,)), writes one slot of the StaticKVCache in place
and attends over all max_len slots under the cache's key mask. So one capture, for a fixed batch
size and cache, serves every token: per token the new ids and positions are copied into the
buffers, the slot index is set, and the graph is replayed.

Why the capture may run the real step first: the warm-up calls (on a side stream, as CUDA
graph capture requires; they also compile the Triton kernels) compute exactly the step being
asked for, from the same inputs, and write the same keys and values into the same slot, so
running it again by replay leaves the cache as one eager step would.

Falls back to the eager decode_step_static (warning once per process) when capture fails, e.g.
a kernel that synchronises with the host. generate() uses this on CUDA unless cuda_graphs=False.
"""

import warnings

import torch

WARMUP_STEPS = 2  # eager runs before capture: lazy initialisation and Triton compilation happen here

_warned = False


def wanted(model, device: torch.device, *, enabled: bool, decode_step=None) -> bool:
    """Whether generate() should replay a CUDA graph: asked for, no custom decode_step, CUDA
    tensors, and a model with the graph-capturable step."""
    return (
        bool(enabled)
        and decode_step is None
        and torch.device(device).type == "cuda"
        and hasattr(model, "decode_step_static")
    )


class GraphedDecodeStep:
    """model.decode_step's signature, (tokens (B,), positions (B,), cache, padded) -> logits
    (B, V) float32, backed by one CUDA graph of model.decode_step_static for `cache`.

    The returned logits are the graph's static output buffer: valid until the next call (generate
    samples from them at once). Each call advances cache.length by one, as decode_step does.
    """

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache
        batch, device = cache.batch_size, cache.device
        # Static inputs: the graph reads these addresses on every replay.
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None
        self.failed = False  # capture failed: every call runs the eager static step
        self.replays = 0

    def load_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> None:
        """Copies this step's token ids and positions into the static buffers and points the
        slot at the cache's next free one."""
        if cache is not self.cache:
            raise ValueError("cache: expected the StaticKVCache this decode graph was captured for")
        if tokens.shape != self.tokens.shape or positions.shape != self.positions.shape:
            raise ValueError(
                f"tokens, positions: expected ({self.tokens.shape[0]},) each (the captured batch), got "
                f"{tuple(tokens.shape)} and {tuple(positions.shape)}"
            )
        if cache.length >= cache.max_len:
            raise ValueError(f"cache: full ({cache.max_len} slots), no room for another decode step")
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.slot.fill_(cache.length)

    def __call__(self, tokens, positions, cache, padded: bool = True) -> torch.Tensor:
        self.load_inputs(tokens, positions, cache)
        if self.graph is None and not self.failed:
            self._capture()
        if self.graph is not None:
            with torch.cuda.device(self.cache.device):  # the graph's device, whatever is current
                self.graph.replay()
            self.replays += 1
            logits = self.logits
        else:
            logits = self._eager()
        cache.advance(1)
        return logits

    def _eager(self) -> torch.Tensor:
        return self.model.decode_step_static(self.tokens, self.positions, self.slot, self.cache)

    def _capture(self) -> None:
        """Warm-up on a side stream, then capture; on any failure mark the step eager (the
        warm-up already wrote this step's keys and values, which the eager step rewrites).
        Everything runs with the cache's device current: Triton launches, the streams and the
        graph's memory pool all follow the current device (a cache on cuda:1 captures there)."""
        try:
            with torch.cuda.device(self.cache.device):
                graph, logits = self._warm_up_and_capture()
        except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
            self.failed = True
            _warn_once(error)
            return
        self.graph, self.logits = graph, logits

    def _warm_up_and_capture(self):
        side = torch.cuda.Stream(device=self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._eager()
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._eager()
        return graph, logits


def _warn_once(error: Exception) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"CUDA graph capture of the decode step failed ({type(error).__name__}: {error}); decoding "
        "eagerly instead (pass cuda_graphs=False to generate() to skip the attempt).",
        RuntimeWarning,
        stacklevel=3,
    )


def decode_step_for(model, cache) -> GraphedDecodeStep:
    """The graphed step for `cache`, kept on the model and reused by the next generate() with the
    same cache (a capture costs tens of milliseconds; the graph stays valid while the cache's
    buffers live). One per model: a new cache replaces it."""
    step = getattr(model, "_graphed_decode_step", None)
    if step is None or step.cache is not cache:
        step = GraphedDecodeStep(model, cache)
        model._graphed_decode_step = step
    return step


def reusable_cache(model, batch_size: int, max_len: int):
    """The cache of the model's graphed step when it has exactly this batch size and length and
    the model's dtype and device (so its captured graph replays as is), else None."""
    step = getattr(model, "_graphed_decode_step", None)
    if step is None:
        return None
    cache = step.cache
    same = (cache.batch_size == batch_size and cache.max_len == max_len
            and cache.dtype == getattr(model, "dtype", cache.dtype)
            and cache.device == getattr(model, "device", cache.device))
    return cache if same else None
