"""The CPU fast path of SmolVLM's decode step: the whole decoder stack and the head in one native
call (csrc/cpu/decode.cpp), so Python runs once per token instead of ~12 torch ops per layer, and
the weights are read in place (no packed second copy: half the memory of the packed path).

Used by SmolVLM.decode_step when `applies` says so: CPU, gradients off, bfloat16 weights on a CPU
with AVX512-BF16 or float32 weights on one with AVX-512, at most MAX_ROWS (32) rows, the plain modules
the model was built with (no hooks, no replaced Linear), a contiguous cache in the model's dtype,
and no forced VLMFAST_BACKEND other than cpp. Anything else runs the eager path, which gives the
same answer up to float32 summation order.

The plan (weight addresses, position tables) comes from a layout: `LlamaLayout` (SmolVLM's
decoder, and LLaVA's and Qwen2-VL's through views of them) here; BLIP-2's OPT has its own
(models/blip2/native_decode.py), run by the same machinery and kernel.

decode_step checks all that before every step, as a call from anywhere must be checked.
generate() asks `sequence_steps` for its steps instead: checked once for the whole call, as
nothing can change the model between the tokens of one call. The per-step check costs more than
it seems: it walks ~250 modules and tensors that the step's weight streaming has just pushed out
of the CPU's caches, 0.4 ms a token on the 2-core Zen 4 (56 us with warm caches), 5 % of a
SmolVLM2-256M bf16 step.
"""

import torch
from torch import nn

from vlmfast.models.smolvlm import decoder as _decoder
from vlmfast.native import decode as _native
from vlmfast.ops import _dispatch

# Rows up to which the native step runs. Its matrix-vector kernel works in tiles of 4 weight rows x
# 4 rows of x (csrc/cpu/decode_gemv.h), so at 8-32 rows it runs near the multiply-add rate and
# still beats the eager path's GEMMs (torch's float32 ones, oneDNN's packed bf16 ones), which also
# pay ~12 torch ops a layer. Measured per step on the 2-core AMD EPYC Zen 4, one thread, thread CPU
# time, loaded machine: LLaVA's bench decoder (float32, 226 cached tokens) 20.4 vs 48.6 ms at
# 8 rows, 38.8 vs 81.8 at 16; SmolVLM2-256M bf16 19.8 vs 38.1 ms at 8 rows, 72.5 vs 105.1 at 32.
# (With one row of x per tile the limit had been 2: about even with oneDNN there, behind at 4.)
MAX_ROWS = 32
_ATTR = "_vlmfast_fast_decode"


def plain(module: nn.Module, kind: type) -> bool:
    """module is exactly a `kind` with no forward hooks (the native step would skip them)."""
    hooks = (module._forward_hooks, module._forward_pre_hooks)
    return type(module) is kind and not any(hooks)


def _hooked(modules: tuple) -> bool:
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules if m is not None)


class LlamaLayout:
    """Where a SmolVLM-layout model keeps what the native Llama step reads: model.model.text_model
    (embed_tokens, layers, norm, rotary_tables), model.lm_head / head_weight, model.config.text_config."""

    kind = _native.LLAMA

    @staticmethod
    def modules(model) -> tuple:
        """Every module the native step stands in for, found through the _modules dicts (no
        nn.Module.__getattr__: this runs before every decode_step call to notice a replaced
        module or a new hook)."""
        text = model._modules["model"]._modules["text_model"]
        found = [text, text._modules["norm"], text._modules["embed_tokens"], model._modules.get("lm_head")]
        for layer in text._modules["layers"]._modules.values():
            attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
            found += (layer, layer._modules["input_layernorm"], layer._modules["post_attention_layernorm"],
                      attn["qkv"], attn["o_proj"], mlp["gate_up"], mlp["down_proj"])
        return tuple(found)

    @staticmethod
    def applies(model) -> bool:
        cfg = model.config.text_config
        if getattr(cfg, "rope_type", "default") not in ("default", "linear"):
            return False
        return model.model.text_model.norm.__class__ is _decoder.RMSNorm

    @staticmethod
    def parameters(model) -> list:
        return list(model.model.text_model.parameters()) + [model.head_weight]

    @staticmethod
    def layer_tensors(model) -> list[dict] | None:
        """Each layer's tensors by decode.LAYER_FIELDS name, None if a module was replaced."""
        out = []
        for layer in model.model.text_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = ((layer, _decoder.DecoderLayer), (attn, _decoder.DecoderAttention), (mlp, _decoder.SwiGLU),
                     (layer.input_layernorm, _decoder.RMSNorm), (layer.post_attention_layernorm, _decoder.RMSNorm),
                     (attn.qkv, nn.Linear), (attn.o_proj, nn.Linear), (mlp.gate_up, nn.Linear),
                     (mlp.down_proj, nn.Linear))
            if not all(plain(m, kind) for m, kind in parts):
                return None
            out.append({"input_norm": layer.input_layernorm.weight, "qkv": attn.qkv.weight, "qkv_bias": attn.qkv.bias,
                        "o_proj": attn.o_proj.weight, "o_bias": attn.o_proj.bias,
                        "post_norm": layer.post_attention_layernorm.weight, "gate_up": mlp.gate_up.weight,
                        "gate_up_bias": mlp.gate_up.bias, "down": mlp.down_proj.weight, "down_bias": mlp.down_proj.bias})
        return out

    @staticmethod
    def ends(model) -> tuple:
        """(embedding, final norm weight, final norm bias or None, head weight)."""
        text = model.model.text_model
        return text.embed_tokens.weight, text.norm.weight, None, model.head_weight

    @staticmethod
    def dims(model) -> tuple:
        """(D, H, Hkv, E, I, (eps, score scale, query scale))."""
        cfg = model.config.text_config
        return (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                cfg.intermediate_size, (float(cfg.rms_norm_eps), cfg.head_dim ** -0.5, 1.0))

    @staticmethod
    def position_tables(model, rows: int) -> tuple:
        """(cos, sin, None): the rotary tables of positions [0, rows), as the eager path computes
        each one (text.rotary_tables, rounded through the model's dtype)."""
        cos, sin = model.model.text_model.rotary_tables(torch.arange(rows)[None], model.dtype)
        return cos.contiguous(), sin.contiguous(), None


def _dtype_supported(dtype: torch.dtype) -> bool:
    native = _native.module()
    if native is None:
        return False
    features = native.cpu_features()
    if dtype == torch.bfloat16:
        return _native.has_avx512_bf16()
    return dtype == torch.float32 and bool(features.get("avx512f"))


class _Plan:
    """The weights' addresses for one model state and one cache (rebuilt when either moves), and
    the position tables of every position up to their row count."""

    def __init__(self, layout, model, cache):
        layers = layout.layer_tensors(model)
        if layers is None:
            raise _NotPlain
        for i, tensors in enumerate(layers):
            tensors["k_cache"], tensors["v_cache"] = cache.keys[i], cache.values[i]
        self.embed, self.final_norm, self.final_norm_bias, self.head = layout.ends(model)
        self.tensors = [t for layer in layers for t in layer.values() if t is not None]
        self.tensors += [t for t in (self.embed, self.final_norm, self.final_norm_bias, self.head) if t is not None]
        self.key = _state_key(self.tensors)
        self.table = _native.layer_table(layers)
        self.cache_keys = cache.keys[0]
        self.modules = layout.modules(model)
        *dims, self.scales = layout.dims(model)
        self.dims = (*dims, self.head.shape[0], len(layers))
        self.kind = layout.kind
        self._tables = lambda rows: layout.position_tables(model, rows)
        self.rows = 0
        self.cover(cache.max_len)

    def cover(self, rows: int) -> None:
        """Position tables for positions [0, rows) at least (a learned table: as far as it goes):
        positions usually stay below the cache's length, but Qwen2-VL's may pass it (a video's
        temporal positions)."""
        if self.rows >= rows:
            return
        self.cos, self.sin, self.learned = self._tables(max(rows, 2 * self.rows))
        # a learned table has the rows it has (the step refuses positions past them)
        self.rows = (self.cos if self.learned is None else self.learned).shape[0]

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, cache, threads: int) -> torch.Tensor:
        """The native step on tokens / positions int64 (B,) contiguous, positions inside the
        tables: logits float32 (B, V); keys/values at slot cache.length, marked real in its key
        mask (padded or not, as the eager step marks it), and the cache advanced."""
        shape = (tokens.shape[0], *self.dims, cache.max_len, cache.length)
        logits = _native.step(shape, self.kind, self.scales, tokens, positions, self.embed, self.table,
                              self.final_norm, self.final_norm_bias, self.head, self.cos, self.sin, self.learned,
                              cache.key_mask, threads)
        cache.advance(1)
        return logits


class _NotPlain(Exception):
    pass


def _state_key(tensors) -> tuple:
    return tuple(t.data_ptr() for t in tensors)


def _eligible_tensors(layout, model, cache) -> bool:
    dtype = model.dtype
    if any(t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in layout.parameters(model)):
        return False
    buffers = cache.keys + cache.values
    return all(b.dtype == dtype and b.device.type == "cpu" and b.is_contiguous() for b in buffers)


def applies(model, tokens: torch.Tensor, cache, layout=LlamaLayout) -> bool:
    """Whether decode_step can run natively for these rows and this cache (see the module doc)."""
    if torch.is_grad_enabled() or tokens.device.type != "cpu" or tokens.shape[0] > MAX_ROWS:
        return False
    if torch.compiler.is_compiling():  # addresses of traced tensors mean nothing: trace the eager step
        return False
    if _dispatch.forced_backend() not in (None, "cpp"):
        return False
    return _dtype_supported(model.dtype) and layout.applies(model)


def will_run(model, tokens: torch.Tensor, cache, layout=LlamaLayout) -> bool:
    """Whether model.decode_step will take the native path for these rows and this cache."""
    return applies(model, tokens, cache, layout) and _plan_for(model, cache, layout) is not None


def _plan_for(model, cache, layout=LlamaLayout) -> "_Plan | None":
    plan = model.__dict__.get(_ATTR)
    if plan is not None:
        modules = layout.modules(model)
        if _hooked(modules):
            return None
        if plan.cache_keys is cache.keys[0] and modules == plan.modules and _state_key(plan.tensors) == plan.key:
            return plan
    model.__dict__.pop(_ATTR, None)
    if not _eligible_tensors(layout, model, cache):
        return None
    try:
        plan = _Plan(layout, model, cache)
    except _NotPlain:
        return None
    if _hooked(plan.modules):
        return None
    model.__dict__[_ATTR] = plan
    return plan


def _check_rows(tokens: torch.Tensor, positions: torch.Tensor, cache) -> None:
    """The native step writes row b of the cache for tokens[b]: their counts must agree."""
    rows = cache.key_mask.shape[0]
    if tuple(tokens.shape) != (rows,) or tuple(positions.shape) != (rows,):
        raise ValueError(f"tokens, positions: expected ({rows},) each (one per cache row), got "
                         f"{tuple(tokens.shape)} and {tuple(positions.shape)}")


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, cache, padded: bool = True,
                layout=LlamaLayout):
    """SmolVLM.decode_step natively: tokens int (B,), positions int (B,) -> logits float32 (B, V),
    keys/values written at slot cache.length, which advances by one. Returns None (having done
    nothing) when this model or cache cannot run here (`applies`, then the plan); the caller then
    runs the eager step. padded is not needed: the native step reads the key mask either way."""
    if not applies(model, tokens, cache, layout):
        return None
    plan = _plan_for(model, cache, layout)
    if plan is None:
        return None
    _check_rows(tokens, positions, cache)
    positions = positions.to(torch.int64).contiguous()
    plan.cover(int(positions.max()) + 1)
    return plan.run(tokens.to(torch.int64).contiguous(), positions, cache, torch.get_num_threads())


def sequence_steps(model, tokens: torch.Tensor, positions: torch.Tensor, cache, layout=LlamaLayout):
    """decode_step for the rest of one generate() call on `cache`, checked here once (see the
    module doc), or None where the native step does not run. tokens: the rows' next tokens (their
    count is checked), positions int64 (B,): the last prompt token's, stepped in place by the
    caller. The returned step must see no change to the model (weights, modules, hooks) while it
    is used: generate() runs nothing between its tokens but the streamer."""
    if (positions.dtype != torch.int64 or not positions.is_contiguous()
            or not applies(model, tokens, cache, layout)):
        return None
    plan = _plan_for(model, cache, layout)
    if plan is None:
        return None
    _check_rows(tokens, positions, cache)
    plan.cover(int(positions.max()) + cache.max_len - cache.length + 1)
    threads = torch.get_num_threads()
    own_cache = cache

    def step(tokens: torch.Tensor, positions: torch.Tensor, cache, padded: bool = True) -> torch.Tensor:
        if cache is not own_cache:
            raise ValueError("cache: expected the cache these steps were made for")
        if tokens.dtype != torch.int64 or not tokens.is_contiguous():
            tokens = tokens.to(torch.int64).contiguous()
        return plan.run(tokens, positions, cache, threads)

    return step
