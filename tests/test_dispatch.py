"""Backend choice: defaults by device, forcing, and falling back when an extension is missing."""

import subprocess
import sys
import textwrap

import pytest
import torch

from vlmfast import ops
from vlmfast.ops import _dispatch


def _tables(length, half):
    angles = torch.rand(length, half)
    return angles.cos(), angles.sin()


def _ran(op, backend, fn):
    before = _dispatch.calls[(op, backend)]
    fn()
    return _dispatch.calls[(op, backend)] > before


def test_cpu_tensors_default_to_cpp(monkeypatch):
    monkeypatch.delenv("VLMFAST_BACKEND", raising=False)
    x = torch.randn(2, 5, 32)
    assert _ran("rotary", "cpp", lambda: ops.apply_rotary_emb(x, *_tables(5, 16)))


def test_float64_runs_the_reference_even_when_forced(monkeypatch):
    monkeypatch.setenv("VLMFAST_BACKEND", "cpp")
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    assert _ran("rotary", "reference", lambda: ops.apply_rotary_emb(x, *_tables(5, 16)))


def test_forcing_a_backend_that_cannot_run_warns_once_and_uses_the_default(monkeypatch):
    monkeypatch.setenv("VLMFAST_BACKEND", "cuda")
    _dispatch._warned.discard(("forced", "cuda", "cpu"))
    x = torch.randn(2, 5, 32)
    with pytest.warns(RuntimeWarning, match="VLMFAST_BACKEND=cuda cannot run on cpu tensors"):
        assert _ran("rotary", "cpp", lambda: ops.apply_rotary_emb(x, *_tables(5, 16)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.apply_rotary_emb(x, *_tables(5, 16))


def test_missing_extension_falls_back_with_one_warning():
    """`import vlmfast` works without vlmfast._C; ops warn once and give the reference's answer."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["vlmfast._C"] = None  # makes `import vlmfast._C` raise ImportError
        import torch, vlmfast
        from vlmfast import ops
        from vlmfast.ops import _dispatch, reference
        x = torch.randn(2, 5, 32); angles = torch.rand(5, 16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ops.apply_rotary_emb(x, angles.cos(), angles.sin())
            ops.apply_rotary_emb(x, angles.cos(), angles.sin())
        messages = [str(w.message) for w in caught if "vlmfast._C is not available" in str(w.message)]
        assert len(messages) == 1, messages
        assert "pip install -e ." in messages[0]
        assert _dispatch.calls[("rotary", "reference")] == 2, dict(_dispatch.calls)
        torch.testing.assert_close(out, reference.apply_rotary_emb(x, angles.cos(), angles.sin()))
        print("ok")
        """
    )
    env = {"VLMFAST_BACKEND": "", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
