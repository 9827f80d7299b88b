"""Every registered op on every backend that runs here, against the torch reference.

The cases are ``fastinfluence bench``'s (``fastinfluence.cli.bench``): per op and backend the
time, the useful GFLOP, the backend that actually ran (``ran``; a backend that does not cover
the inputs falls back to torch, ``fallback`` says why) and the relative error against torch.
``bench/results_from_benchmark.py`` writes them to ``bench/results/ops_cpu.json``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastinfluence import ops
from fastinfluence.cli.bench import OPS, SIZES, _cases
from fastinfluence.ops._backend import implements

SIZE = os.environ.get("BENCH_OPS_SIZE", "small")
DEVICE = torch.device("cpu")


def _pairs():
    cases = _cases(SIZES[SIZE], DEVICE)
    out = []
    for name in OPS:
        make, call, _ = cases[name]
        with ops.use_backend("torch"), ops.trace() as dispatched:
            call(make())
        names = {d.op for d in dispatched}
        for backend in ops.available_backends(DEVICE):
            if backend == "torch" or any(implements(backend, op, DEVICE) for op in names):
                out.append((name, backend))
    return out


@pytest.mark.parametrize("op,backend", _pairs())
def test_op(timed, op, backend):
    make, call, flops = _cases(SIZES[SIZE], DEVICE)[op]
    inputs = make()
    with ops.use_backend("torch"):
        ref = call(inputs).double()
    with ops.use_backend(backend):
        with ops.trace() as ran:
            out = call(inputs)
        err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
        fallbacks = [d.fallback for d in ran if d.fallback]
        timed(
            lambda: call(inputs),
            group="ops",
            op=op,
            backend=backend,
            ran=",".join(sorted({d.backend for d in ran})),
            fallback=fallbacks[0] if fallbacks else None,
            device=str(DEVICE),
            size=SIZE,
            flops=flops,
            rel_err_vs_torch=err,
            torch=torch.__version__,
        )
    # float32 throughout: a few ulps per accumulated product
    assert err < 1e-4, f"{op} on {backend}: rel err {err:.1e} against torch"
