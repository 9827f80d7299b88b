"""Triton project / project_tokens against the float64 torch reference."""

import pytest
import torch
from helpers import rel_err
from test_triton_support import DEVICES, DTYPES, TOL, on_backend, randn

from fastinfluence import ops
from fastinfluence.ops.project import project_reference, project_tokens_reference
from fastinfluence.triton_kernels import project, project_tokens


def _inputs(device, dtype, B, T, d_in, d_out, k_in, k_out, bias, seed=0):
    """A, G, P_in, P_out (entries N(0, 1/k), float32) and a mask; masked rows of A hold NaN."""
    g = torch.Generator().manual_seed(seed)
    A = randn(B, T, d_in, dtype=dtype, device=device, generator=g)
    G = randn(B, T, d_out, dtype=dtype, device=device, generator=g)
    P_in = randn(d_in + int(bias), k_in, device=device, generator=g, scale=k_in**-0.5)
    P_out = randn(d_out, k_out, device=device, generator=g, scale=k_out**-0.5)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(device)
    A[~mask] = float("nan")  # padding may hold anything; it must not leak
    return A, G, P_in, P_out, mask


def _reference(fn, A, G, P_in, P_out, mask, *extra):
    return fn(A.double(), G.double(), P_in.double(), P_out.double(), mask, *extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_matches_reference_with_bias_row_and_mask(device, dtype, poisoned):
    # T not a multiple of the token block, widths not powers of two, several token splits.
    A, G, P_in, P_out, mask = _inputs(device, dtype, B=3, T=37, d_in=40, d_out=23, k_in=17, k_out=33, bias=True)
    phi = project(A, G, P_in, P_out, mask)
    assert phi.shape == (3, 33, 17) and phi.dtype == torch.float32
    assert rel_err(phi, _reference(project_reference, A, G, P_in, P_out, mask)) <= TOL[device, dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_in,k_out", [(16, 128), (128, 16)])
def test_project_rank_bounds_16_and_128_without_mask(device, k_in, k_out, poisoned):
    A, G, P_in, P_out, _ = _inputs(
        device, torch.bfloat16, B=2, T=20, d_in=24, d_out=19, k_in=k_in, k_out=k_out, bias=False
    )
    A = A.nan_to_num(1.5)  # every token counts here
    ref = _reference(project_reference, A, G, P_in, P_out, None)
    assert rel_err(project(A, G, P_in, P_out), ref) <= TOL[device, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_project_accepts_strided_inputs(device, poisoned):
    A, G, P_in, P_out, mask = _inputs(
        device, torch.float32, B=2, T=18, d_in=21, d_out=30, k_in=20, k_out=24, bias=False
    )
    A_t = A.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, d) view with batch stride d
    G_s = G[:, :, ::2]
    ref = _reference(project_reference, A, G_s, P_in, P_out[::2], mask)
    assert rel_err(project(A_t, G_s, P_in, P_out[::2], mask), ref) <= TOL[device, torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_project_tokens_fuses_mask_and_cast(device, dtype, out_dtype, poisoned):
    A, G, P_in, P_out, mask = _inputs(device, dtype, B=2, T=21, d_in=33, d_out=18, k_in=24, k_out=17, bias=True)
    At, Gt = project_tokens(A, G, P_in, P_out, mask, out_dtype)
    ref_A, ref_G = _reference(project_tokens_reference, A, G, P_in, P_out, mask)
    assert At.dtype == Gt.dtype == (out_dtype or torch.float32)
    assert At.shape == (2, 21, 24) and Gt.shape == (2, 21, 17)
    assert bool((At[~mask] == 0).all()) and bool((Gt[~mask] == 0).all())
    # An out_dtype of bfloat16 adds one rounding (2^-9 relative) to the operand roundings.
    tol = TOL[device, dtype] + (4e-3 if out_dtype == torch.bfloat16 else 0.0)
    assert rel_err(At, ref_A) <= tol and rel_err(Gt, ref_G) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_project_llama_layer_shapes_on_gpu(dtype, poisoned):
    # The shapes the kernel is tuned for: up/down projections of Llama-3-8B, k = 64.
    A, G, P_in, P_out, mask = _inputs("cuda", dtype, B=2, T=1000, d_in=4096, d_out=14336, k_in=64, k_out=64, bias=False)
    ref = _reference(project_reference, A, G, P_in, P_out, mask)
    assert rel_err(project(A, G, P_in, P_out, mask), ref) <= TOL["cuda", dtype]


def test_identity_projection_and_float64_run_on_the_reference():
    A, G, P_in, P_out, mask = _inputs("cpu", torch.float64, B=2, T=5, d_in=6, d_out=4, k_in=3, k_out=2, bias=True)
    for args in ((A, G, P_in, None, mask), (A, G, P_in, P_out, mask)):
        out, ran = on_backend("triton", ops.project, *args)
        assert torch.equal(out, project_reference(*args)) and ran == ["torch"]
    out, ran = on_backend("triton", ops.project, A.float(), G.float(), None, P_out, mask)
    assert out.shape == (2, 2, 6) and ran == ["torch"]


def test_ranks_above_128_run_on_the_reference():
    A, G, P_in, P_out, mask = _inputs("cpu", torch.float32, B=2, T=5, d_in=6, d_out=4, k_in=3, k_out=130, bias=False)
    out, ran = on_backend("triton", ops.project, A, G, P_in, P_out, mask)
    assert torch.equal(out, project_reference(A, G, P_in, P_out, mask)) and ran == ["torch"]
