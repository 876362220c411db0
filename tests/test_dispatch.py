"""The one backend policy (ops/_dispatch.py): defaults by device, forcing, the op's own kernels,
fallbacks (warned once, an error under VLMFAST_STRICT=1 on CUDA) and a missing extension; and the
launch record: what the launchers record is the kernel that ran, not the choice."""

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


def test_the_record_is_the_kernel_that_ran(monkeypatch):
    """Forcing the reference runs (and records) the reference only; forcing Triton runs its
    launcher, which records it; neither counts the C++ kernel."""
    x = torch.randn(2, 5, 32)
    for forced in ("reference", "triton"):
        monkeypatch.setenv("VLMFAST_BACKEND", forced)
        before = dict(_dispatch.calls)
        ops.apply_rotary_emb(x, *_tables(5, 16))
        ran = {key for key, n in _dispatch.calls.items() if n > before.get(key, 0)}
        assert ran == {("rotary", forced)}, (forced, ran)


def test_an_op_without_a_kernel_on_the_forced_backend_runs_its_reference(monkeypatch):
    """linear has no Triton kernel: forced Triton, it runs torch's path (one warning), and the
    policy notes it (the tests' backend fixture then skips instead of failing)."""
    monkeypatch.setenv("VLMFAST_BACKEND", "triton")
    _dispatch._warned.discard(("no kernel", "linear", "triton"))
    x, w = torch.randn(20, 8), torch.randn(6, 8)
    unserved = _dispatch.no_kernel[("linear", "triton")]
    with pytest.warns(RuntimeWarning, match="VLMFAST_BACKEND=triton: linear has no triton kernel"):
        assert _ran("linear", "reference", lambda: ops.linear(x, w))
    assert not _ran("linear", "cpp", lambda: ops.linear(x, w))
    assert _dispatch.no_kernel[("linear", "triton")] == unserved + 2
    torch.testing.assert_close(ops.linear(x, w), x @ w.T)


def test_every_op_asks_the_same_policy():
    """The kernels table answers for every op; CPU tensors go to C++ wherever it has a kernel,
    CUDA tensors to Triton first (the CUDA C++ kernels only where Triton has none)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for op, kernels in _dispatch.KERNELS.items():
        assert set(kernels) <= {"triton", "cpp", "cuda"}, op
        assert _dispatch._decide(op, "cpu", torch.float32, None, None)[0] == ("cpp" if "cpp" in kernels else "reference")
        if "triton" in kernels and _dispatch.triton_installed():  # then it serves CUDA tensors
            assert _dispatch._decide(op, "cuda", torch.bfloat16, None, None)[0] == "triton", op
    assert _dispatch.select("attention", cpu, torch.float64) == "reference"


def test_cuda_fallback_to_the_reference_warns_once_and_raises_when_strict(monkeypatch):
    """Decided without a GPU (the policy looks at the device type only): attention of float64
    CUDA tensors has no kernel, so it would materialise the scores in the reference."""
    cuda = torch.device("cuda")
    monkeypatch.delenv("VLMFAST_BACKEND", raising=False)
    monkeypatch.delenv("VLMFAST_STRICT", raising=False)
    _dispatch._warned.discard(("reference on cuda", "attention", "no kernel takes torch.float64"))
    with pytest.warns(RuntimeWarning, match="attention on CUDA tensors falls back to its PyTorch reference"):
        assert _dispatch.select("attention", cuda, torch.float64) == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select("attention", cuda, torch.float64) == "reference"  # once only
        assert _dispatch.select("linear", cuda, torch.float32) == "reference"  # cuBLAS by design
    monkeypatch.setenv("VLMFAST_STRICT", "1")
    with pytest.raises(RuntimeError, match="falls back to its PyTorch reference .*VLMFAST_STRICT=1"):
        _dispatch.select("attention", cuda, torch.float64)
    monkeypatch.setenv("VLMFAST_BACKEND", "reference")  # asked for: no fallback, no error
    assert _dispatch.select("attention", cuda, torch.float64) == "reference"


def test_cuda_without_triton_or_extension_falls_back(monkeypatch):
    monkeypatch.delenv("VLMFAST_BACKEND", raising=False)
    monkeypatch.setenv("VLMFAST_STRICT", "1")
    monkeypatch.setattr(_dispatch, "triton_installed", lambda: False)
    _dispatch._decide.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="rotary on CUDA tensors falls back"):
            _dispatch.select("rotary", torch.device("cuda"), torch.float16)  # no _C_cuda here either
    finally:
        _dispatch._decide.cache_clear()


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
