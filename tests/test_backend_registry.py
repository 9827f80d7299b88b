"""The backend registry: a backend registered from outside the package is used for the op it
implements and covers, the registry falls back to torch for the rest, and bench says what ran."""

from __future__ import annotations

import pytest
import torch

from fastinfluence import ops
from fastinfluence.cli import bench as bench_cli
from fastinfluence.ops.jl_project import jl_project_reference


class ToyBackend:
    """Implements jl_project only (by the reference math), and declines float64 inputs."""

    def __init__(self):
        self.calls = 0

    def is_available(self, device):
        return device.type == "cpu", "the toy backend runs on the CPU"

    def supports_jl_project(self, x, **_):
        return True if x.dtype != torch.float64 else "float64 is not covered"

    def jl_project(self, x, k, seed=0, kind="rademacher", offset=0):
        self.calls += 1
        return jl_project_reference(x, k, seed, kind, offset)


@pytest.fixture
def toy():
    backend = ToyBackend()
    ops.register_backend("toy", backend)
    try:
        yield backend
    finally:
        ops.unregister_backend("toy")


def test_a_registered_backend_runs_the_op_it_covers(toy):
    x = torch.randn(3, 50)
    with ops.use_backend("toy"), ops.trace() as ran:
        out = ops.jl_project(x, 16, seed=3)
    assert toy.calls == 1 and ran == [ops.Dispatch("jl_project", "toy", None)]
    assert torch.equal(out, jl_project_reference(x, 16, 3))
    assert ops.get_backend() != "toy"  # use_backend restores the selection


def test_the_registry_falls_back_to_torch_for_other_ops_and_uncovered_inputs(toy):
    A, G = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    with ops.use_backend("toy"), ops.trace() as ran:
        phi = ops.project(A, G, None, None)
        ops.jl_project(torch.randn(2, 8, dtype=torch.float64), 4)
    assert toy.calls == 0
    assert [(d.op, d.backend) for d in ran] == [("project", "torch"), ("jl_project", "torch")]
    assert "does not implement project" in ran[0].fallback and "float64 is not covered" in ran[1].fallback
    torch.testing.assert_close(phi, torch.einsum("bto,bti->boi", G, A))


def test_auto_tries_a_backend_registered_for_the_device_type():
    backend = ToyBackend()
    ops.register_backend("toy", backend, auto=("cpu",))
    try:
        with ops.use_backend("auto"), ops.trace() as ran:
            ops.jl_project(torch.randn(2, 8), 4)
    finally:
        ops.unregister_backend("toy")
    # after the backends registered before it for CPUs: the compiled host twin, where it is built
    assert ran[0].backend == ("cpu" if "cpu" in ops.available_backends("cpu") else "toy")


def test_bench_reports_the_backend_that_ran(toy):
    declining = ToyBackend()
    declining.supports_jl_project = lambda x, **_: "declines every input"
    ops.register_backend("toy_declining", declining)
    try:
        rows = bench_cli.run("small", repeats=1, device="cpu", ops_filter=["jl_project"])
    finally:
        ops.unregister_backend("toy_declining")
    got = {r["backend"]: (r["ran"], r["fallback"]) for r in rows}
    assert got["toy"] == ("toy", None) and toy.calls >= 2
    assert got["toy_declining"] == (
        "torch",
        "backend 'toy_declining' does not cover these inputs: declines every input",
    )
    assert declining.calls == 0


def test_registering_a_taken_or_reserved_name_is_refused(toy):
    with pytest.raises(ValueError, match="registered already"):
        ops.register_backend("toy", ToyBackend())
    with pytest.raises(ValueError, match="other than 'torch' and 'auto'"):
        ops.register_backend("torch", ToyBackend())


def test_every_registered_op_has_a_bench_case():
    covered = set().union(*bench_cli.case_ops("small", "cpu").values())
    assert covered == set(ops.registered_ops())
