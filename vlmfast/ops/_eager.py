"""When an op may run its body directly instead of through its torch.library custom op.

The custom op is what torch.compile traces, what torch.func transforms and tensor subclasses
(fake, functional) see, and what carries autograd. An eager inference call on plain tensors
needs none of that, and the custom op costs it twice: ~20-40 us of Python dispatch a call, and,
on the first call in a process, the import of torch._dynamo (torch._compile's disable wrapper
around every custom op's kernel imports it): ~1.5 s and ~150 MiB resident on the 2-core Zen 4,
in a process that never compiles (`vlmfast generate`, a server's workers).
"""

import torch

# nn.Parameter is a subclass only by name: the custom op treats it as the tensor it is
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain(t) -> bool:
    """t is a plain tensor (or a parameter): no subclass that the custom op must see."""
    return type(t) in PLAIN_TYPES


def untraced() -> bool:
    """Outside torch.compile, torch.func transforms and torch.jit.trace."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch.jit.is_tracing())


def plain_inference(*tensors) -> bool:
    """Whether the call may skip the custom op: outside torch.compile, torch.func and
    torch.jit.trace (which must record the op, not the body's raw kernel calls), every tensor
    given (None skipped) plain, none of them needing a gradient."""
    if not untraced():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not plain(t) or (grad and t.requires_grad)):
            return False
    return True
