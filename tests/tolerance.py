"""The tolerance rule (flash-attention's): a fused result's max error against the float64
reference is at most `factor` times the error of the reference itself run in the same low
precision (2x for values, 3x for gradients); float32 must be within 1e-5 relative."""

import torch


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close(actual, expected64, low_precision_reference=None, *, factor=2.0, name="output"):
    """actual: the fused result; expected64: the float64 reference; low_precision_reference:
    the reference computed in actual's dtype (needed for float16/bfloat16)."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(1.0, expected64.abs().max().item()) if expected64.numel() else 1.0
    error = max_error(actual, expected64)
    if actual.dtype in (torch.float32, torch.float64):
        bound = 1e-5 * scale
    else:
        assert low_precision_reference is not None, f"{name}: a {actual.dtype} check needs the reference in {actual.dtype}"
        # The floor covers the (rare) case where the low-precision reference is exact.
        bound = factor * max_error(low_precision_reference, expected64) + 1e-3 * scale * (
            torch.finfo(actual.dtype).eps
        )
    assert error <= bound, f"{name}: max error {error:.3g} exceeds {bound:.3g} ({actual.dtype})"

