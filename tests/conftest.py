"""Shared test set-up: tiny random-config models, batches, and the slow per-example reference."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter; it must be chosen before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests' models are tiny: a second thread buys no time and, on a shared 2-core machine,
    # spins on busy cores (2.4-3.7 times the suite's CPU time, measured on a loaded machine). One
    # thread here and in the Python processes the tests start, unless OMP_NUM_THREADS says
    # otherwise; tests about thread counts set their own.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned(monkeypatch):
    """``torch.empty`` returns NaN (floats) or -7 (integers), so any output a kernel does not write shows."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
