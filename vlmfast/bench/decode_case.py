"""The decode case of the smolvlm and qwen2vl suites: ms per decode step of vlmfast's generate
against transformers', measured as (generate of N tokens - generate of 1 token) / (N - 1) over interleaved
pairs (timing.paired_step_ms), so the prompt, the first token and start-up cancel, for both
implementations alike. The Result's GB/s is the decoder's weight bytes read per step (decoder_weight_bytes)
over the step's time: the runner shows it as a share of the measured copy bandwidth, the roof of a
step at a few rows, where every weight is read once per step."""

import torch
from torch import nn

from vlmfast.bench.timing import Result, paired_step_ms


def decoder_weight_bytes(hf) -> int:
    """Bytes of the weights one decode step reads in full, found on the transformers model `hf`
    (any of the families: get_decoder / get_output_embeddings): every parameter of the decoder
    stack and the head, counted once, except the embedding tables it only gathers rows from (token
    and learned positions), unless the head is tied to one and so streams it."""
    head, decoder = hf.get_output_embeddings().weight, hf.get_decoder()
    params = {id(p): p for p in decoder.parameters()}
    params[id(head)] = head
    gathered = {id(p) for m in decoder.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    gathered.discard(id(head))
    return sum(p.numel() * p.element_size() for key, p in params.items() if key not in gathered)


def decode_case(suite: str, ours, hf, ids: torch.Tensor, mask: torch.Tensor, *, pad_token_id: int, n_new: int,
                device: torch.device, dtype: torch.dtype, repeats: dict) -> Result:
    """ours: the vlmfast model, hf: transformers' (same weights); ids, mask: (B, L) text prompts,
    left-padded; pad_token_id: transformers' generate's. extra: tokens/s of both, and whether
    their greedy tokens are equal (float32). gbps: the decoder's weight bytes per step over our step."""
    batch = ids.shape[0]
    cache = ours.new_cache(batch, ids.shape[1] + n_new)

    def ours_generate(n):
        return ours.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], cache=cache)

    def hf_generate(n):
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad_token_id)

    per_step = [paired_step_ms(generate, n_new, repeats["repeats"])[1] for generate in (ours_generate, hf_generate)]
    same = torch.equal(ours_generate(n_new), hf_generate(n_new)) if dtype == torch.float32 else None
    ms, peer_ms = per_step
    name = str(dtype).removeprefix("torch.")
    return Result(suite, f"decode b={batch} {name}", "vlmfast", ms, "transformers", peer_ms,
                  gbps=decoder_weight_bytes(hf) / ms / 1e6,
                  extra={"tokens_per_s": batch * 1e3 / ms, "peer_tokens_per_s": batch * 1e3 / peer_ms,
                         "greedy_equal": same})
