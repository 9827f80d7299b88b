"""Triton ghost_dot / ghost_norm against the float64 torch reference."""

import pytest
import torch
from helpers import rel_err
from test_triton_support import DEVICES, DTYPES, TOL, on_backend, randn

from fastinfluence.ops.ghost import ghost_dot_reference, ghost_norm_reference
from fastinfluence.triton_kernels import ghost_dot, ghost_norm

# Ghost products multiply two rounded Gram blocks: allow twice the projection bounds.
GHOST_TOL = {key: 2 * tol for key, tol in TOL.items()}


def _factors(device, dtype, B, T, d_in, d_out, seed):
    """A, G and a mask with at least one real token per example; masked rows hold NaN."""
    g = torch.Generator().manual_seed(seed)
    A = randn(B, T, d_in, dtype=dtype, device=device, generator=g)
    G = randn(B, T, d_out, dtype=dtype, device=device, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask = mask.to(device)
    A[~mask] = float("nan")
    G[~mask] = float("inf")
    return A, G, mask


def _double(*tensors):
    return [t.double() for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_ghost_dot_matches_reference(device, dtype, bias, poisoned):
    # T1 != T2, neither a multiple of the token block; d not powers of two.
    A1, G1, m1 = _factors(device, dtype, B=3, T=21, d_in=20, d_out=35, seed=1)
    A2, G2, m2 = _factors(device, dtype, B=2, T=18, d_in=20, d_out=35, seed=2)
    out = ghost_dot(A1, G1, A2, G2, m1, m2, bias)
    ref = ghost_dot_reference(*_double(A1, G1, A2, G2), m1, m2, bias)
    assert out.shape == (3, 2) and out.dtype == torch.float32
    assert rel_err(out, ref) <= GHOST_TOL[device, dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ghost_norm_matches_reference_with_bias(device, dtype, poisoned):
    # 2 examples x 35 tokens: split over token ranges to fill the device.
    A, G, mask = _factors(device, dtype, B=2, T=35, d_in=17, d_out=24, seed=3)
    out = ghost_norm(A, G, mask, bias=True)
    ref = ghost_norm_reference(*_double(A, G), mask, bias=True)
    assert out.shape == (2,) and out.dtype == torch.float32
    assert rel_err(out, ref) <= GHOST_TOL[device, dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_ghost_dot_without_masks_is_symmetric_in_its_sets(device, poisoned):
    A1, G1, _ = _factors(device, torch.float32, B=2, T=9, d_in=19, d_out=16, seed=4)
    A2, G2, _ = _factors(device, torch.float32, B=3, T=12, d_in=19, d_out=16, seed=5)
    A1, G1, A2, G2 = (t.nan_to_num(0.5, posinf=0.5) for t in (A1, G1, A2, G2))
    ref = ghost_dot_reference(*_double(A1, G1, A2, G2))
    assert rel_err(ghost_dot(A1, G1, A2, G2), ref) <= GHOST_TOL[device, torch.float32]
    assert rel_err(ghost_dot(A2, G2, A1, G1), ref.T) <= GHOST_TOL[device, torch.float32]


@pytest.mark.gpu
def test_ghost_dot_llama_widths_on_gpu(poisoned):
    A1, G1, m1 = _factors("cuda", torch.bfloat16, B=4, T=300, d_in=4096, d_out=1024, seed=6)
    A2, G2, m2 = _factors("cuda", torch.bfloat16, B=5, T=200, d_in=4096, d_out=1024, seed=7)
    ref = ghost_dot_reference(*_double(A1, G1, A2, G2), m1, m2)
    assert rel_err(ghost_dot(A1, G1, A2, G2, m1, m2), ref) <= GHOST_TOL["cuda", torch.bfloat16]


def test_float64_and_mixed_dtypes_run_on_the_reference():
    from fastinfluence import ops

    A, G, mask = _factors("cpu", torch.float64, B=2, T=5, d_in=6, d_out=4, seed=8)
    out, ran = on_backend("triton", ops.ghost_norm, A, G, mask)
    assert torch.equal(out, ghost_norm_reference(A, G, mask)) and ran == ["torch"]
    ref = ghost_dot_reference(A.float(), G.float(), A, G, mask, mask)
    out, ran = on_backend("triton", ops.ghost_dot, A.float(), G.float(), A, G, mask, mask)
    assert torch.equal(out, ref) and ran == ["torch"]
