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


@host_built
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_jl_binding_writes_every_output(kind):
    torch.manual_seed(0)
    x = torch.randn(7, 1030)
    out = torch.full((7, 45), float("nan"))
    cpu._ext.jl_project(x.data_ptr(), 0, 7, 1030, 1030, out.data_ptr(), 45, 3, cpu.KINDS[kind], 0, jl_scale(45), 2)
    assert not out.isnan().any()
    ref = jl_project_reference(x, 45, 3, kind)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@host_built
def test_topk_binding_writes_every_output():
    torch.manual_seed(1)
    S = torch.randn(4, 90)
    values, indices = torch.full((4, 12), float("nan")), torch.full((4, 12), -1)
    empty_v, empty_i = torch.empty(4, 0), torch.empty(4, 0, dtype=torch.int64)
    cpu._ext.topk_merge(
        S.data_ptr(),
        0,
        4,
        90,
        90,
        500,
        empty_v.data_ptr(),
        empty_i.data_ptr(),
        0,
        12,
        values.data_ptr(),
        indices.data_ptr(),
        2,
    )
    top, _ = score_topk_reference(S, torch.eye(90), 12, index_offset=500)
    assert torch.equal(indices, top.indices) and torch.equal(values, top.values)


@host_built
def test_bindings_reject_unsupported_dtypes():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        cpu._ext.jl_project(0, 3, 1, 1, 1, 0, 1, 0, 0, 0, 1.0, 1)
    with pytest.raises(ValueError, match="float32 or float64"):
        cpu._ext.topk_merge(0, 2, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1)


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
