"""What a caller hands the engine and what it gets back.

    params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, seed=1, stop=["\n\n"])
    request = Request(input_ids, {"pixel_values": pv, "pixel_attention_mask": pm}, params)
    handle = engine.submit(request, on_event=print)      # Event(text, token_ids, finished, ...)

temperature 0 means greedy (argmax). A sampled request draws from its own torch.Generator
seeded with `seed` (a random seed when None), one multinomial draw per token: the draws
SmolVLM.generate(..., do_sample=True, generator=torch.Generator().manual_seed(seed)) makes for
the same request alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets

import torch

_ids = itertools.count(1)


@dataclasses.dataclass
class SamplingParams:
    """max_tokens: new tokens at most (>= 1). temperature: 0 greedy, else > 0. top_p in (0, 1].
    top_k: None / 0 off. seed: an int >= 0 or None (random). stop: strings that end the answer
    (not included in it). ignore_eos: do not stop at the model's stop tokens."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an int >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise ValueError(f"top_k: expected None or an int >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed: expected None or an int in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: expected a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator | None:
        """The request's own generator (None when greedy)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed)


@dataclasses.dataclass
class Request:
    """input_ids: int (L,) or (1, L), the whole prompt (chat template applied, image tokens
    written out). vision: the model's vision inputs for this one prompt, by the names its
    generate() takes (SmolVLM: pixel_values (1, N, C, H, W), pixel_attention_mask (1, N, H, W)).
    """

    input_ids: torch.Tensor
    vision: dict = dataclasses.field(default_factory=dict)
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    request_id: str = ""

    def __post_init__(self):
        if not isinstance(self.input_ids, torch.Tensor) or self.input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids: expected an int64 tensor of token ids")
        ids = self.input_ids
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"input_ids: expected (L,) or (1, L) with L >= 1, got {tuple(self.input_ids.shape)}")
        self.input_ids = ids.to(torch.int64)
        if not isinstance(self.vision, dict):
            raise TypeError("vision: expected a dict of the model's vision inputs")
        self.vision = {k: v for k, v in self.vision.items() if v is not None}
        if not isinstance(self.params, SamplingParams):
            raise TypeError("params: expected a SamplingParams")
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"

    @property
    def prompt_len(self) -> int:
        return self.input_ids.numel()


@dataclasses.dataclass
class Event:
    """One update of a request. text: new text since the last event (stop strings and an
    unfinished character held back); token_ids: new tokens. finished: the last event, with
    finish_reason "stop" (a stop token or string), "length" (max_tokens), "abort" (cancelled) or
    "error" (error holds the message)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys / values came from the prefix cache
    completion_tokens: int = 0
    error: str | None = None


class QueueFull(RuntimeError):
    """The engine's queue is at its limit: try again later (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The engine takes no new requests (HTTP 503)."""
