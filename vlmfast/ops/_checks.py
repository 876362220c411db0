"""The op layer's input validation. The helpers live in vlmfast/runtime/checks.py, below the op
layer, because native launchers (native/decode.py) check their own arguments with them too."""

from vlmfast.runtime.checks import (  # noqa: F401
    FLOAT_DTYPES,
    bias,
    floating,
    integer,
    rank,
    same_device,
    shape_of,
    tensor,
)
