"""The compiled host module at its raw-pointer interface, and the build that must never fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastinfluence.ops.jl_project import jl_project_reference, jl_scale
from fastinfluence.ops.score_topk import score_topk_reference

cpu = pytest.importorskip("fastinfluence.ops.backends.cpu")
host_built = pytest.mark.skipif(cpu._ext is None, reason="the C++ host kernels are not built")
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def jl_args(**overrides) -> dict:
    """jl_project's arguments: x (7, 1030) float32 -> out (7, 45), seed 3, gaussian entries, 2 threads."""
    args = dict(x=0, dtype=0, B=7, D=1030, ldx=1030, out=0, k=45, seed=3, kind=1, offset=0, scale=jl_scale(45))
    return {**args, "num_threads": 2, **overrides}


def topk_args(**overrides) -> dict:
    """topk_merge's arguments: S (4, 90) float32 at index offset 500, no previous top-k, k = 12, 2 threads."""
    args = dict(S=0, dtype=0, Q=4, n=90, lds=90, index_offset=500, prev_values=0, prev_indices=0, kp=0, k_out=12)
    return {**args, "values": 0, "indices": 0, "num_threads": 2, **overrides}


@host_built
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_jl_binding_writes_every_output(kind):
    torch.manual_seed(0)
    x = torch.randn(7, 1030)
    out = torch.full((7, 45), float("nan"))
    cpu._ext.jl_project(**jl_args(x=x.data_ptr(), out=out.data_ptr(), kind=cpu.KINDS[kind]))
    assert not out.isnan().any()
    ref = jl_project_reference(x, 45, 3, kind)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@host_built
def test_topk_binding_writes_every_output():
    torch.manual_seed(1)
    S = torch.randn(4, 90)
    values, indices = torch.full((4, 12), float("nan")), torch.full((4, 12), -1)
    empty_v, empty_i = torch.empty(4, 0), torch.empty(4, 0, dtype=torch.int64)
    pointers = dict(S=S.data_ptr(), prev_values=empty_v.data_ptr(), prev_indices=empty_i.data_ptr())
    cpu._ext.topk_merge(**topk_args(**pointers, values=values.data_ptr(), indices=indices.data_ptr()))
    top, _ = score_topk_reference(S, torch.eye(90), 12, index_offset=500)
    assert torch.equal(indices, top.indices) and torch.equal(values, top.values)


@host_built
def test_bindings_reject_unsupported_dtypes():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        cpu._ext.jl_project(**jl_args(dtype=3))
    with pytest.raises(ValueError, match="float32 or float64"):
        cpu._ext.topk_merge(**topk_args(dtype=2))


@host_built
def test_bindings_take_their_arguments_by_name_only():
    # every argument is an integer: two swapped by position would run, so position is refused
    with pytest.raises(TypeError, match="incompatible function arguments"):
        cpu._ext.jl_project(*jl_args().values())
    with pytest.raises(TypeError, match="incompatible function arguments"):
        cpu._ext.topk_merge(*topk_args().values())


def test_build_without_a_compiler_warns_and_succeeds(tmp_path, monkeypatch, capfd):
    setuptools = pytest.importorskip("setuptools")
    pytest.importorskip("pybind11")
    for var in ("CC", "CXX", "LDSHARED"):
        monkeypatch.setenv(var, "/nonexistent/c++")
    monkeypatch.chdir(CSRC.parent)
    monkeypatch.syspath_prepend(str(CSRC))
    sys.modules.pop("build_helpers", None)
    import build_helpers

    dist = setuptools.Distribution({"ext_modules": build_helpers.extension_modules()})
    cmd = build_helpers.OptionalBuildExt(dist)
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()  # must not raise
    assert "_fi_cpu not built" in capfd.readouterr().err
    assert not list((tmp_path / "lib").rglob("_fi_cpu*"))


def test_missing_host_module_falls_back_to_torch_with_one_warning(monkeypatch):
    from fastinfluence import ops

    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_warned", False)
    monkeypatch.setattr(cpu, "_why_not", "the C++ host kernels are not built (no compiler)")
    ops.set_backend("auto")
    torch.manual_seed(2)
    x = torch.randn(3, 200)
    with pytest.warns(RuntimeWarning, match="not built.*run on torch") as record:
        out = ops.jl_project(x, 16, seed=4)
        ops.jl_project(x, 16, seed=4)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert torch.equal(out, jl_project_reference(x, 16, 4))
