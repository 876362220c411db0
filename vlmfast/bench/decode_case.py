"""The decode case of the smolvlm and qwen2vl suites: ms per decode step of vlmfast's generate
against transformers', measured as (generate of N tokens - generate of 1 token) / (N - 1), so
the prompt, the first token and start-up cancel, for both implementations alike."""

import torch

from vlmfast.bench.timing import Result, time_ms


def decode_case(suite: str, batch: int, ours_generate, peer_generate, *, n_new: int, device: torch.device,
                dtype: torch.dtype, repeats: dict) -> Result:
    """ours_generate(n) / peer_generate(n): generate n tokens after the same `batch` prompts and
    return the ids. extra: tokens/s of both, and whether their greedy tokens are equal (float32)."""
    per_step = []
    for generate in (ours_generate, peer_generate):
        full = time_ms(lambda: generate(n_new), device, **repeats)
        one = time_ms(lambda: generate(1), device, **repeats)
        per_step.append(max(full - one, 1e-6) / (n_new - 1))
    same = torch.equal(ours_generate(n_new), peer_generate(n_new)) if dtype == torch.float32 else None
    ms, peer_ms = per_step
    name = str(dtype).removeprefix("torch.")
    return Result(suite, f"decode b={batch} {name}", "vlmfast", ms, "transformers", peer_ms,
                  extra={"tokens_per_s": batch * 1e3 / ms, "peer_tokens_per_s": batch * 1e3 / peer_ms,
                         "greedy_equal": same})
