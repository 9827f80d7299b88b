"""The torch references of the ops against the formulas written out densely, and the backend registry."""

import pytest
import torch
from helpers import rel_err

from fastinfluence import ops
from fastinfluence.ops import _backend


def _factors(B=3, T=7, d_in=5, d_out=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64).to(dtype)
    G = torch.randn(B, T, d_out, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return A, G, mask


def _dense_grads(A, G, mask, bias):
    A, G = A.double() * mask[..., None], G.double() * mask[..., None]
    if bias:
        A = torch.cat([A, mask[..., None].double()], -1)
    return torch.einsum("bto,bti->boi", G, A)


@pytest.mark.parametrize("bias", [False, True])
def test_project_equals_projected_dense_gradient(bias):
    A, G, mask = _factors()
    P_in = torch.randn(A.shape[-1] + int(bias), 4, dtype=torch.float64)
    P_out = torch.randn(G.shape[-1], 3, dtype=torch.float64)
    ref = P_out.T @ _dense_grads(A, G, mask, bias) @ P_in
    assert rel_err(ops.project(A, G, P_in, P_out, mask), ref) <= 1e-12
    At, Gt = ops.project_tokens(A, G, P_in, P_out, mask)
    assert rel_err(Gt.transpose(1, 2) @ At, ref) <= 1e-12
    assert bool((At[~mask] == 0).all()) and bool((Gt[~mask] == 0).all())


def test_project_identity_sides_and_masked_nan():
    A, G, mask = _factors()
    A[~mask] = float("nan")  # padding may hold anything; it must not leak
    G[~mask] = float("inf")
    out = ops.project(A, G, None, None, mask)
    assert torch.isfinite(out).all()
    assert rel_err(out, _dense_grads(torch.nan_to_num(A), torch.nan_to_num(G), mask, False)) <= 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_project_low_precision_accumulates_in_float32(dtype, tol):
    """Inputs are rounded to ``dtype`` (relative 2^-8 bf16, 2^-11 fp16); sums run in float32."""
    A, G, mask = _factors(B=2, T=33, d_in=20, d_out=12, dtype=dtype)
    P_in, P_out = torch.randn(20, 16), torch.randn(12, 16)
    out = ops.project(A, G, P_in.to(dtype), P_out.to(dtype), mask)
    assert out.dtype == torch.float32
    ref = P_out.to(dtype).double().T @ _dense_grads(A, G, mask, False) @ P_in.to(dtype).double()
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("bias", [False, True])
def test_ghost_dot_and_norm_equal_dense_inner_products(bias):
    A1, G1, m1 = _factors(B=10, T=6, seed=1)  # more rows than one reference step
    A2, G2, m2 = _factors(B=4, T=9, seed=2)
    W1, W2 = _dense_grads(A1, G1, m1, bias).flatten(1), _dense_grads(A2, G2, m2, bias).flatten(1)
    assert rel_err(ops.ghost_dot(A1, G1, A2, G2, m1, m2, bias), W1 @ W2.T) <= 1e-12
    assert rel_err(ops.ghost_norm(A1, G1, m1, bias), (W1 * W1).sum(1)) <= 1e-12


def test_ghost_dot_shape_errors():
    A, G, m = _factors()
    with pytest.raises(ValueError, match="widths differ"):
        ops.ghost_dot(A, G, A[..., :-1], G, m, m)
    with pytest.raises(ValueError, match="mask"):
        ops.ghost_norm(A, G, m[:, :-1])


def test_score_topk_streamed_over_chunks_equals_full_topk():
    g = torch.Generator().manual_seed(3)
    Q, X = torch.randn(5, 16, generator=g), torch.randn(37, 16, generator=g)
    qs, xs = 1 / Q.norm(dim=1), 1 / X.norm(dim=1)
    full = (Q @ X.T) * qs[:, None] * xs[None, :]
    top, aggs = None, []
    for s in range(0, 37, 8):  # k = 12 is larger than one chunk
        top, agg = ops.score_topk(Q, X[s : s + 8], 12, qs, xs[s : s + 8], index_offset=s, prev=top)
        aggs.append(agg)
    ref = torch.topk(full, 12, dim=1)
    assert torch.equal(top.indices, ref.indices)
    assert torch.allclose(top.values, ref.values, atol=1e-6)
    agg = torch.cat(aggs, dim=1)
    assert torch.allclose(agg, torch.stack([full.sum(0), (full * full).sum(0), full.amax(0)]), atol=1e-5)


def test_merge_topk_breaks_ties_to_lower_index():
    vals = torch.tensor([[1.0, 2.0, 2.0, 2.0]])
    top = ops.merge_topk(vals, torch.tensor([[0, 5, 3, 9]]), 2)
    assert top.indices.tolist() == [[3, 5]]
    top = ops.merge_topk(torch.tensor([[2.0]]), torch.tensor([[1]]), 2, prev=top)
    assert top.indices.tolist() == [[1, 3]]


def test_backend_selection(monkeypatch):
    monkeypatch.setattr(_backend, "_selected", None)
    monkeypatch.setenv("FASTINFLUENCE_BACKEND", "torch")
    assert ops.get_backend() == "torch"
    ops.set_backend("auto")
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown fastinfluence backend"):
        ops.set_backend("tpu")
    assert "torch" in ops.available_backends("cpu")


def test_named_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_selected", "cuda")
    monkeypatch.setitem(_backend._loaded, "cuda", ImportError("extension not built"))
    A, G, m = _factors()
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.project(A, G, None, None, m)
    monkeypatch.setattr(_backend, "_selected", "auto")  # auto falls back quietly
    assert torch.isfinite(ops.project(A, G, None, None, m)).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("identity_out", [False, True])
def test_cpu_bfloat16_project_close_to_float32_reference(bias, identity_out):
    """The host path for bfloat16 inputs (autocast extraction): side products in bfloat16.

    Against the torch reference on the same bfloat16 inputs (which up-casts them and runs every
    product in float32), it adds one rounding of each projected token to bfloat16 (relative
    2^-9, about 2e-3) and the rounding of a Gaussian P to bfloat16 (the same size): measured
    3-4e-3 over odd shapes; 1e-2 bounds it while a wrong transpose, mask or bias row gives O(1).
    """
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("the C++ host backend is not built")
    A, G, mask = _factors(B=3, T=37, d_in=29, d_out=19, dtype=torch.bfloat16, seed=5)
    A[~mask] = float("nan")  # padding is dropped, not multiplied
    g = torch.Generator().manual_seed(6)
    P_in = torch.randn(29 + int(bias), 11, generator=g)
    P_out = None if identity_out else torch.randn(19, 7, generator=g)
    reference = _backend._ops["project"]
    with ops.use_backend("auto"), ops.trace() as ran:
        out = ops.project(A, G, P_in, P_out, mask)
    assert [(e.op, e.backend) for e in ran] == [("project", "cpu")]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, reference(A=A, G=G, P_in=P_in, P_out=P_out, mask=mask)) <= 1e-2
    dense = _dense_grads(torch.nan_to_num(A), G, mask, bias)
    dense = (P_out.double().T @ dense if P_out is not None else dense) @ P_in.double()
    assert rel_err(out, dense) <= 1e-2
    # autocast: a float32 norm feeds some layers; its inputs are not bfloat16 values
    A32 = A.float() + 1e-3 * torch.randn(A.shape, generator=g)
    with ops.use_backend("auto"), ops.trace() as ran:
        mixed = ops.project(A32, G, P_in, P_out, mask)
    assert [(e.op, e.backend) for e in ran] == [("project", "cpu")]
    dense32 = _dense_grads(torch.nan_to_num(A32), G, mask, bias)
    dense32 = (P_out.double().T @ dense32 if P_out is not None else dense32) @ P_in.double()
    assert rel_err(mixed, dense32) <= 1e-2
    with ops.use_backend("auto"), ops.trace() as ran:  # float32 inputs keep the float32 reference
        ops.project(A.float(), G.float(), P_in, P_out, mask)
    assert [(e.op, e.backend) for e in ran] == [("project", "torch")]
