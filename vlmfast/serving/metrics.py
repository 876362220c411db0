"""Serving metrics: counters, gauges, time to first token, and their Prometheus text form."""

from __future__ import annotations

import collections
import threading
import time


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Metrics:
    """Written by the engine thread, read by the server: one lock around both."""

    WINDOW_S = 10.0  # tokens/s over the last WINDOW_S seconds
    KEEP = 2048  # time-to-first-token samples kept for the quantiles

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # by finish reason
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = collections.deque(maxlen=self.KEEP)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self._recent = collections.deque()  # (time, tokens) of recent steps

    def finished(self, reason: str) -> None:
        with self.lock:
            self.requests[reason] += 1

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        with self.lock:
            self.ttft.append(seconds)
            self.ttft_sum += seconds
            self.ttft_count += 1
            self.prompt_tokens += prompt_tokens

    def tokens(self, count: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generated_tokens += count
            self._recent.append((now, count))
            while self._recent and self._recent[0][0] < now - self.WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            recent = [c for t, c in self._recent if t >= now - self.WINDOW_S]
        return sum(recent) / self.WINDOW_S

    def snapshot(self) -> dict:
        with self.lock:
            ttft = list(self.ttft)
            return {"requests": dict(self.requests), "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": self.generated_tokens, "ttft_p50_s": _quantile(ttft, 0.5),
                    "ttft_p99_s": _quantile(ttft, 0.99), "ttft_sum_s": self.ttft_sum,
                    "ttft_count": self.ttft_count}


def prometheus_text(snapshot: dict, gauges: dict) -> str:
    """The exposition format (text/plain; version=0.0.4)."""
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"{name}{label} {value}")

    metric("vlmfast_queue_length", "gauge", "requests waiting for a slot", [({}, gauges["queue"])])
    metric("vlmfast_running_requests", "gauge", "requests in the running batch (decoding)", [({}, gauges["running"])])
    metric("vlmfast_prefilling_requests", "gauge", "requests being prefilled", [({}, gauges["prefilling"])])
    metric("vlmfast_kv_cache_usage", "gauge", "fraction of the KV cache's slots holding tokens",
           [({}, f"{gauges['kv_usage']:.4f}")])
    metric("vlmfast_tokens_per_second", "gauge", "generated tokens per second over the last 10 s",
           [({}, f"{gauges['tokens_per_second']:.2f}")])
    metric("vlmfast_generated_tokens_total", "counter", "tokens generated", [({}, snapshot["generated_tokens"])])
    metric("vlmfast_prompt_tokens_total", "counter", "prompt tokens prefilled", [({}, snapshot["prompt_tokens"])])
    metric("vlmfast_requests_total", "counter", "finished requests by finish reason",
           [({"finish_reason": k}, v) for k, v in sorted(snapshot["requests"].items())] or [({"finish_reason": "stop"}, 0)])
    metric("vlmfast_time_to_first_token_seconds", "summary", "time from arrival to the first token",
           [({"quantile": "0.5"}, f"{snapshot['ttft_p50_s']:.6f}"), ({"quantile": "0.99"}, f"{snapshot['ttft_p99_s']:.6f}")])
    lines.append(f"vlmfast_time_to_first_token_seconds_sum {snapshot['ttft_sum_s']:.6f}")
    lines.append(f"vlmfast_time_to_first_token_seconds_count {snapshot['ttft_count']}")
    metric("vlmfast_encoder_runs_total", "counter", "vision encoder runs (tiles or prompts encoded)",
           [({}, gauges["encoder_runs"])])
    metric("vlmfast_encoder_cache_hits_total", "counter", "images answered from the encoder cache",
           [({}, gauges["encoder_hits"])])
    metric("vlmfast_prefix_cache_hits_total", "counter", "prompts that reused a cached prefix",
           [({}, gauges.get("prefix_hits", 0))])
    metric("vlmfast_prefix_cache_tokens_total", "counter", "prompt tokens copied from the prefix cache",
           [({}, gauges.get("prefix_tokens_reused", 0))])
    return "\n".join(lines) + "\n"
