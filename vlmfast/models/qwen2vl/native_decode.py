"""Qwen2-VL's decode step on the native CPU path SmolVLM's decoder has (smolvlm/fast_decode.py:
the whole stack and the head in one C++ call per token, over the plain weights).

The Qwen2 decoder is that Llama decoder's modules (qwen2vl/decoder.py) with a q/k/v bias, which
the native layer table carries, and no o_proj bias, which it leaves out; a decode step with
three equal M-RoPE components is plain 1D rotary. fast_decode reads a SmolVLM's layout
(model.model.text_model, model.lm_head, model.config.text_config): _SmolVLMView shows it this
model's decoder under those names, live (a module replaced later, e.g. by LoRA, is seen and
sends the step down the eager path). Its per-model plan (weight addresses) is kept on the view.
"""

from types import SimpleNamespace

from vlmfast.models.smolvlm import fast_decode

_VIEW = "_smolvlm_view"


class _SmolVLMView:
    def __init__(self, owner):
        self._owner = owner

    @property
    def _modules(self) -> dict:
        text = self._owner.model.language_model
        return {"model": SimpleNamespace(_modules={"text_model": text}), "lm_head": self._owner.lm_head}

    @property
    def model(self):
        return SimpleNamespace(text_model=self._owner.model.language_model)

    @property
    def config(self):
        return self._owner.config

    @property
    def dtype(self):
        return self._owner.dtype

    @property
    def head_weight(self):
        return self._owner.head_weight


def _view(model) -> _SmolVLMView:
    view = model.__dict__.get(_VIEW)
    if view is None:
        view = model.__dict__[_VIEW] = _SmolVLMView(model)
    return view


def will_run(model, tokens, cache) -> bool:
    """Whether decode_step can run natively for these rows and this cache."""
    return fast_decode.will_run(_view(model), tokens, cache)


def decode_step(model, tokens, positions, cache, padded: bool = True):
    """The native step (logits float32 (B, V), the cache advanced), or None when it cannot run
    here (nothing done; the caller runs the eager step). positions: int (B,), 1D rotary."""
    return fast_decode.decode_step(_view(model), tokens, positions, cache, padded)


def sequence_steps(model, tokens, positions, cache):
    """decode_step for the rest of one generate() call, checked once (fast_decode.sequence_steps),
    or None where the native step does not run."""
    return fast_decode.sequence_steps(_view(model), tokens, positions, cache)
