"""BLIP-2's OPT decode step on the native CPU path (csrc/cpu/decode.cpp's OPT kind, run by
smolvlm/fast_decode.py's machinery): the whole stack and the head in one C++ call per token, over
the plain weights, where the eager step ran ~15 torch ops and 4 GEMV calls per layer.

`OPTLayout` tells that machinery where a Blip2 keeps what the step reads. Pre-norm OPT only (the
125m, 1.3b, 2.7b, 6.7b layout), ReLU, one LayerNorm epsilon throughout; anything else (OPT-350m's
post-norm) runs the eager step.
"""

import torch
from torch import nn
from torch.nn import functional as F

from vlmfast.models.blip2 import opt as _opt
from vlmfast.models.smolvlm import fast_decode
from vlmfast.native import decode as _native


class OPTLayout:
    kind = _native.OPT

    @staticmethod
    def modules(model) -> tuple:
        """Every module the native step stands in for, through the _modules dicts (run before
        every decode_step call: a replaced module or a new hook sends the step down the eager path)."""
        language = model._modules["language_model"]
        decoder = language._modules["model"]._modules["decoder"]
        found = [decoder, decoder._modules["embed_tokens"], decoder._modules["embed_positions"],
                 decoder._modules["final_layer_norm"], language._modules.get("lm_head")]
        for layer in decoder._modules["layers"]._modules.values():
            parts = layer._modules
            attn = parts["self_attn"]._modules
            found += (layer, parts["self_attn"], parts["self_attn_layer_norm"], parts["final_layer_norm"],
                      parts["fc1"], parts["fc2"], attn["qkv"], attn["out_proj"])
        return tuple(found)

    @staticmethod
    def applies(model) -> bool:
        cfg = model.config.text_config
        decoder = model.decoder
        if not cfg.do_layer_norm_before or cfg.activation_function != "relu" or decoder.final_layer_norm is None:
            return False
        norms = [decoder.final_layer_norm] + [n for layer in decoder.layers
                                              for n in (layer.self_attn_layer_norm, layer.final_layer_norm)]
        return len({n.eps for n in norms}) == 1

    @staticmethod
    def parameters(model) -> list:
        return list(model.decoder.parameters()) + [model.head_weight]

    @staticmethod
    def layer_tensors(model) -> list[dict] | None:
        """Each layer's tensors by decode.LAYER_FIELDS name (fc1 as gate_up, fc2 as down), None if
        a module was replaced."""
        out = []
        for layer in model.decoder.layers:
            attn = layer.self_attn
            parts = ((layer, _opt.OPTDecoderLayer), (attn, _opt.OPTAttention),
                     (layer.self_attn_layer_norm, nn.LayerNorm), (layer.final_layer_norm, nn.LayerNorm),
                     (attn.qkv, nn.Linear), (attn.out_proj, nn.Linear), (layer.fc1, nn.Linear),
                     (layer.fc2, nn.Linear))
            if layer.act is not F.relu or not all(fast_decode.plain(m, kind) for m, kind in parts):
                return None
            out.append({"input_norm": layer.self_attn_layer_norm.weight,
                        "input_norm_bias": layer.self_attn_layer_norm.bias,
                        "qkv": attn.qkv.weight, "qkv_bias": attn.qkv.bias,
                        "o_proj": attn.out_proj.weight, "o_bias": attn.out_proj.bias,
                        "post_norm": layer.final_layer_norm.weight, "post_norm_bias": layer.final_layer_norm.bias,
                        "gate_up": layer.fc1.weight, "gate_up_bias": layer.fc1.bias,
                        "down": layer.fc2.weight, "down_bias": layer.fc2.bias})
        return out

    @staticmethod
    def ends(model) -> tuple:
        norm = model.decoder.final_layer_norm
        return model.decoder.embed_tokens.weight, norm.weight, norm.bias, model.head_weight

    @staticmethod
    def dims(model) -> tuple:
        cfg = model.config.text_config
        E = cfg.head_dim
        return (cfg.hidden_size, cfg.num_attention_heads, cfg.num_attention_heads, E, cfg.ffn_dim,
                (float(model.decoder.final_layer_norm.eps), 1.0, E ** -0.5))

    @staticmethod
    def position_tables(model, rows: int) -> tuple:
        """(None, None, learned): the learned positions, row p for position p (OPT's table keeps two
        rows before position 0). rows past the table are refused by the step itself."""
        return None, None, model.decoder.embed_positions.weight[_opt.POSITION_OFFSET:]


def will_run(model, tokens: torch.Tensor, cache) -> bool:
    return fast_decode.will_run(model, tokens, cache, OPTLayout)


def decode_step(model, tokens, positions, cache, padded: bool = True):
    """The native step (logits float32 (B, V), the cache advanced), or None when it cannot run here
    (nothing done; the caller runs the eager step)."""
    return fast_decode.decode_step(model, tokens, positions, cache, padded, OPTLayout)


def sequence_steps(model, tokens, positions, cache):
    """decode_step for the rest of one generate() call, checked once (fast_decode.sequence_steps),
    or None where the native step does not run."""
    return fast_decode.sequence_steps(model, tokens, positions, cache, OPTLayout)
