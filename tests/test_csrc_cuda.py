"""CUDA kernels against the host twin (bit for bit) and the torch reference. Run with -m gpu."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from fastinfluence.ops.jl_project import jl_entries, jl_project_reference, jl_scale
from fastinfluence.ops.score_topk import TopK, score_topk_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
KINDS = ["rademacher", "gaussian"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cuda():
    from fastinfluence.ops.backends import cuda

    ok, why = cuda.is_available(torch.device("cuda"))
    assert ok, why
    return cuda


@pytest.fixture(scope="module")
def cpu():
    from fastinfluence.ops.backends import cpu

    if cpu._ext is None:
        pytest.skip("the C++ host kernels are not built")
    return cpu


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0, 77_777])
def test_cuda_entries_equal_reference_bit_for_bit(cuda, kind, offset):
    D, k = 517, 300
    out = cuda.jl_project(torch.eye(D, device="cuda"), k, 2**35 + 3, kind, offset)
    assert torch.equal(out.cpu(), jl_entries(D, k, 2**35 + 3, kind, offset) * jl_scale(k))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5, 37])
def test_cuda_equals_host_twin_bit_for_bit(cuda, cpu, kind, dtype, B):
    torch.manual_seed(B)
    x = torch.randn(B, 3001).to(dtype)
    assert torch.equal(cuda.jl_project(x.cuda(), 517, 12, kind, 5).cpu(), cpu.jl_project(x, 517, 12, kind, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_reference(cuda, kind):
    torch.manual_seed(0)
    x = torch.randn(9, 5000, device="cuda")
    assert rel_err(cuda.jl_project(x, 1000, 4, kind, 0), jl_project_reference(x.cpu(), 1000, 4, kind)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_result_does_not_depend_on_the_workspace_window(cuda, kind, monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(6, 9000, device="cuda")
    wide = cuda.jl_project(x, 129, 2, kind, 0)
    monkeypatch.setattr(cuda, "_WORKSPACE_FLOATS", 6 * 129 * 2)  # two chunks in flight at a time
    assert torch.equal(cuda.jl_project(x, 129, 2, kind, 0), wide)


def test_cuda_binding_writes_every_output(cuda):
    torch.manual_seed(2)
    x = torch.randn(40, 2100, device="cuda")
    out = torch.full((40, 333), float("nan"), device="cuda")
    ws = torch.empty(3 * 40 * 333, device="cuda")
    cuda._extension().jl_project(
        x=x.data_ptr(),
        dtype=0,
        B=40,
        D=2100,
        ldx=2100,
        out=out.data_ptr(),
        k=333,
        seed=8,
        kind=1,
        offset=0,
        scale=jl_scale(333),
        ws=ws.data_ptr(),
        ws_chunks=3,
        stream=torch.cuda.current_stream().cuda_stream,
    )
    assert not out.isnan().any()
    assert rel_err(out, jl_project_reference(x.cpu(), 333, 8, "gaussian")) < 1e-5


def assert_same(fast, ref):
    (top, agg), (top_ref, agg_ref) = fast, ref
    assert torch.equal(top.indices.cpu(), top_ref.indices.cpu())
    torch.testing.assert_close(top.values.cpu(), top_ref.values.cpu(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(agg.cpu(), agg_ref.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 33, 1024])
def test_cuda_topk_matches_reference(cuda, dtype, k):
    torch.manual_seed(k)
    q, x = torch.randn(7, 40, device="cuda", dtype=dtype), torch.randn(3001, 40, device="cuda", dtype=dtype)
    assert_same(cuda.score_topk(q, x, k, index_offset=10), score_topk_reference(q, x, k, index_offset=10))


def test_cuda_topk_ties_nan_and_prev(cuda):
    torch.manual_seed(3)
    q = torch.randint(-2, 3, (5, 6), device="cuda").float()
    x = torch.randint(-2, 3, (700, 6), device="cuda").float()
    x[[5, 400]] = float("nan")
    first = score_topk_reference(q, x[:300], 50)
    prev = TopK(first[0].values, first[0].indices)
    assert_same(
        cuda.score_topk(q, x[300:], 50, index_offset=300, prev=prev),
        score_topk_reference(q, x[300:], 50, index_offset=300, prev=prev),
    )
