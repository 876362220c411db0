"""Fused attention: scaled_dot_product_attention (a drop-in for torch's, plus fused rotary) and
attention_varlen (packed sequences).

One job per file, in the order a call meets them:
  sdpa.py, varlen.py  the public functions: validate, then route the call
  validation.py       argument checks (errors name the argument and the expected shape) and
                      torch's broadcasting of the batch dims
  masks.py            bool / float masks -> one float32 additive bias, expanded with stride 0
  lean.py             eager CPU inference (a decode step): cheap checks, straight to C++
  torch_fallback.py   what no kernel covers (dropout, Ev != E, E > 256, a mask that needs a
                      gradient): torch's own SDPA
  dense_op.py         custom ops vlmfast::attention_fwd / _bwd (fake impls + autograd), and the
                      eager path that runs the same backends without the custom-op dispatch
  varlen_op.py        custom ops vlmfast::attention_varlen_fwd / _bwd
  backends.py         one dense forward / backward on the backend _dispatch chose: Triton
                      (kernels/attention.py), C++ (vlmfast/native/attention.py) or the reference

Rows with no key to attend (every key masked) give zeros and zero gradients, not NaN.
"""

from vlmfast.ops.attention.sdpa import scaled_dot_product_attention
from vlmfast.ops.attention.varlen import attention_varlen

__all__ = ["scaled_dot_product_attention", "attention_varlen"]
