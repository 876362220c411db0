"""Batched generation over a static KV cache.

Rows are left-padded (attention_mask 0 on the padding) and may carry different images; the
prompt runs once (prefill), then one token per row per step (decode_step) into preallocated
buffers: per step no allocation grows with the sequence and no Python work depends on its
length. After a row emits a stop token it receives pad_token_id until every row has stopped
(transformers' convention, so outputs match token for token).

CUDA graphs: `static_shapes=True` runs model.decode_step_static, whose shapes and control
flow do not change between steps (the slot is a tensor, attention reads the whole cache under
its key mask): that is the function to capture. `decode_step` is the hook to pass the replaying
callable: any callable with model.decode_step's signature (tokens (B,), positions (B,), cache,
padded) -> logits (B, V) that advances cache.length by one.
"""

from collections.abc import Callable

import torch

from vlmfast.generation import cuda_graphs as _cuda_graphs
from vlmfast.generation.sampling import check_sampling, next_tokens, stop_token_tensor


def _emit(streamer, tokens: torch.Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(tokens)
    else:
        streamer(tokens)


def infer_padding(input_ids: torch.Tensor, pad_token_id: int | None, stops: torch.Tensor | None) -> torch.Tensor:
    """No attention_mask given: transformers' rule. Tokens equal to the pad id are padding when
    the prompt holds one and the pad id is not a stop token; otherwise nothing is padding.
    Returns bool (B, L), True on real tokens."""
    if pad_token_id is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    is_pad = input_ids == pad_token_id
    if not bool(is_pad.any()) or (stops is not None and bool((stops == pad_token_id).any())):
        return torch.ones_like(input_ids, dtype=torch.bool)
    return ~is_pad


def _native_steps(model, tokens, positions, cache) -> Callable | None:
    """The model's native decode step for this whole call, checked once instead of before every
    token (models/smolvlm/fast_decode.py's sequence_steps), where it offers one and it runs."""
    make = getattr(model, "native_steps", None)
    return make(tokens, positions, cache) if make is not None else None


def _decodes_natively(model, input_ids: torch.Tensor, cache) -> bool:
    """Whether model.decode_step will run the native CPU step (models/smolvlm/fast_decode.py).
    A model that knows itself answers through decodes_natively(tokens, cache) (Qwen2VL)."""
    ask = getattr(model, "decodes_natively", None)
    if ask is not None:
        return bool(ask(input_ids[:, -1], cache))
    if not getattr(model, "fast_decode", False):
        return False
    from vlmfast.models.smolvlm import fast_decode

    return fast_decode.will_run(model, input_ids[:, -1], cache)


def _static_step(model, device) -> Callable:
    """model.decode_step_static behind decode_step's signature; the slot lives in one buffer."""
    slot = torch.zeros(1, dtype=torch.long, device=device)

    def step(tokens, positions, cache, padded=True):
        slot.fill_(cache.length)
        logits = model.decode_step_static(tokens, positions, slot, cache)
        cache.advance(1)
        return logits

    return step


@torch.inference_mode()
def generate(model, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int | None = None, eos_token_id=None, pad_token_id: int | None = None, streamer=None,
             generator: torch.Generator | None = None, cache=None, static_shapes: bool = False,
             decode_step: Callable | None = None, cuda_graphs: bool = True) -> torch.Tensor:
    """Generates up to max_new_tokens tokens per row.

    Arguments:
        model: a SmolVLM (anything with check_inputs / new_cache / prefill / decode_step).
        input_ids: int (B, L), left-padded; pixel_values, pixel_attention_mask: as model.forward.
        attention_mask: (B, L), 0 on the left padding; None: tokens equal to pad_token_id are
            padding if the prompt holds any and it is not a stop token (transformers' rule).
        max_new_tokens: tokens to add at most.
        do_sample, temperature, top_p, top_k, generator: sampling (greedy when do_sample is
            False); the same draws as transformers' for the same torch seed (pass its top_k, or
            top_k=0 to transformers: its default is 50, ours is off).
        eos_token_id: an id or a list of ids that stop a row; None: the decoder config's eos
            token; -1 / []: never stop early.
        pad_token_id: what a stopped row receives (None: the config's pad, else the first stop id).
        streamer: called with each new column of tokens, int (B,) (or an object with put(tokens)
            and optionally end()).
        cache: a StaticKVCache to reuse (reset here); it must hold L + max_new_tokens slots.
        static_shapes: decode with model.decode_step_static (graph-capturable shapes).
        decode_step: replaces model.decode_step (the CUDA-graph hook).
        cuda_graphs: on CUDA (and with no decode_step), replay a CUDA graph of
            model.decode_step_static per token (generation/cuda_graphs.py; eager if capture
            fails). False: decode eagerly. Ignored on the CPU.
    Returns:
        int64 (B, L + T), the prompt followed by T <= max_new_tokens new tokens (fewer when
        every row stopped early).
    """
    model.check_inputs(input_ids, pixel_values, pixel_attention_mask, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    check_sampling(do_sample, temperature, top_p, top_k)
    text = model.config.text_config
    if eos_token_id is None:
        eos_token_id = text.eos_token_id
    if eos_token_id == -1 or eos_token_id == []:
        eos_token_id = None
    stops = stop_token_tensor(eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = text.pad_token_id
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)
    else:
        mask = infer_padding(input_ids, pad_token_id, stops)
    if pad_token_id is None:  # transformers' fallback: stopped rows receive the first stop id
        pad_token_id = int(stops[0]) if stops is not None else 0

    B, L = input_ids.shape
    graphed = _cuda_graphs.wanted(model, input_ids.device, enabled=cuda_graphs, decode_step=decode_step)
    if cache is None and graphed:  # the last graphed cache of this shape: its graph replays as is
        cache = _cuda_graphs.reusable_cache(model, B, L + max_new_tokens)
    if cache is None:
        cache = model.new_cache(B, L + max_new_tokens)
    else:
        cache.reset()
    cache.check_room(B, L + max_new_tokens, what="input_ids")
    if (getattr(model, "auto_pack", False) and not getattr(model, "_packed_once", False)
            and not (decode_step is None and not static_shapes and _decodes_natively(model, input_ids, cache))):
        # CPU bf16: oneDNN-packed weights, same results, about 2x faster GEMV (models/smolvlm/packing.py);
        # not when the native decode step runs: it reads the plain weights, a packed copy would only cost memory
        model._packed_once = True
        if model.dtype == torch.bfloat16:
            model.pack_weights()
    if graphed:
        decode_step = _cuda_graphs.decode_step_for(model, cache)
    step_fn = decode_step or (_static_step(model, input_ids.device) if static_shapes else None)
    padded = not bool(mask.all())

    out = torch.empty(B, L + max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, :L] = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    logits, positions = model.prefill(input_ids, pixel_values, pixel_attention_mask, mask, cache)
    if step_fn is None:
        step_fn = _native_steps(model, input_ids[:, -1], positions, cache) or model.decode_step
    produced = 0
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                             generator=generator)
        if stops is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
        out[:, L + step] = tokens
        produced = step + 1
        _emit(streamer, tokens)
        if stops is not None:
            unfinished &= ~torch.isin(tokens, stops)
            if not bool(unfinished.any()):
                break
        if produced == max_new_tokens:
            break
        positions += 1
        logits = step_fn(tokens, positions, cache, padded)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return out[:, : L + produced]
