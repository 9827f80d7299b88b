"""Shared set-up of the Triton kernel tests (imported by tests/test_triton_*.py).

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here
before triton is imported) on small shapes; with one (``pytest -m gpu``) the same tests
run compiled on CUDA, where float32 products use TF32. Also holds the tests of this set-up.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot be "
            "interpreted on the CPU; set TRITON_INTERPRET=1 in the environment (or in tests/conftest.py)"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from fastinfluence import triton_kernels  # noqa: E402
from fastinfluence.ops import _backend  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# ||out - ref|| / ||ref|| bounds for results accumulated in float32 from inputs of each dtype.
# float32: exact float32 arithmetic in the interpreter, TF32 products on a GPU (~3e-4, with
# margin). bfloat16/float16: the kernels multiply in the input dtype, so a float32 operand
# such as P_in is rounded to 8 (11) mantissa bits first, ~2e-3 (3e-4) relative, twice over.
TOL = {
    ("cpu", torch.float32): 1e-5,
    ("cuda", torch.float32): 3e-3,
    ("cpu", torch.bfloat16): 1.5e-2,
    ("cuda", torch.bfloat16): 1.5e-2,
    ("cpu", torch.float16): 3e-3,
    ("cuda", torch.float16): 3e-3,
}


def on_backend(backend: str, op, *args, **kwargs):
    """(output of ``op`` under ``backend``, the backends that ran each dispatched op)."""
    from fastinfluence import ops

    with ops.use_backend(backend), ops.trace() as ran:
        out = op(*args, **kwargs)
    return out, [d.backend for d in ran]


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    """Fresh normal values (never zeros) made in float32 on the CPU, then cast and moved."""
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)


# Every registered op but jl_project (whose kernels are the compiled cpu/cuda twins) has a Triton kernel.
TRITON_OPS = [op for op in _backend.registered_ops() if op != "jl_project"]


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_backend_implements_every_op_and_says_which_inputs_it_covers(op):
    if not INTERPRET:
        pytest.skip("checks the CPU interpreter route")
    assert _backend.implements("triton", op, "cpu")
    assert callable(getattr(triton_kernels, f"supports_{op}"))


def test_triton_backend_named_without_interpreter_or_gpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_selected", "triton")
    with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _backend.resolve("project", "cpu", {})
