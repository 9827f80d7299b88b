"""CUDA ``project`` (csrc/project.cu) against the float64 torch reference.

The kernel tests are marked ``gpu`` and need a CUDA device of compute capability >= 8.0;
the launch planning (ranks, token splits, operand layout, fallbacks) is checked on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from fastinfluence.ops.backends import cuda
from fastinfluence.ops.project import project_reference


def gpu(test):
    """Mark a test as needing a CUDA device (``pytest -m gpu``); skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


# ||phi - ref|| / ||ref|| bounds. float32 inputs multiply as TF32 (10-bit mantissa, ~5e-4
# per operand rounding); float16 and bfloat16 inputs multiply with P rounded to the input
# dtype (2^-11 and 2^-8 relative), accumulating in float32; phi itself is exact float32.
TOL = {torch.float32: 3e-3, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(scope="module")
def kernel():
    ok, why = cuda.is_available(torch.device("cuda"))
    assert ok, why
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the project kernel needs compute capability 8.0")
    return cuda.project


def inputs(dtype, B, T, d_in, d_out, k_in, k_out, bias=True, seed=0, device="cuda"):
    """A, G (dtype), P_in, P_out (float32, entries N(0, 1/k)) and a mask whose rows of A and G hold NaN."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g).to(dtype)
    G = torch.randn(B, T, d_out, generator=g).to(dtype)
    P_in = torch.randn(d_in + int(bias), k_in, generator=g) * k_in**-0.5
    P_out = torch.randn(d_out, k_out, generator=g) * k_out**-0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    A[~mask] = float("nan")  # padding may hold anything; it must not leak into phi
    G[~mask] = float("inf")
    return [x.to(device) for x in (A, G, P_in, P_out, mask)]


def reference(A, G, P_in, P_out, mask):
    return project_reference(
        A.double().cpu(),
        G.double().cpu(),
        P_in.double().cpu(),
        P_out.double().cpu(),
        None if mask is None else mask.cpu(),
    )


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [16, 64, 128])
@gpu
def test_matches_reference_with_mask_and_bias_row(kernel, dtype, k, poisoned):
    # T spans three token tiles; d_in = 200 streams with cp.async, d_out = 77 element by element.
    A, G, P_in, P_out, mask = inputs(dtype, B=3, T=133, d_in=200, d_out=77, k_in=k, k_out=k)
    phi = kernel(A, G, P_in, P_out, mask)
    assert phi.shape == (3, k, k) and phi.dtype == torch.float32
    assert rel_err(phi, reference(A, G, P_in, P_out, mask)) <= TOL[dtype]


@pytest.mark.parametrize("k_in,k_out", [(16, 128), (128, 16), (33, 17)])
@gpu
def test_unequal_ranks_without_mask_or_bias(kernel, k_in, k_out, poisoned):
    A, G, P_in, P_out, _ = inputs(torch.bfloat16, B=2, T=70, d_in=96, d_out=136, k_in=k_in, k_out=k_out, bias=False)
    A, G = A.nan_to_num(1.5), G.nan_to_num(posinf=-0.5)  # every token counts here
    assert rel_err(kernel(A, G, P_in, P_out), reference(A, G, P_in, P_out, None)) <= TOL[torch.bfloat16]


@gpu
def test_many_token_splits_add_up(kernel, poisoned):
    # One example over many token splits: the partial sums must cover every token once.
    A, G, P_in, P_out, mask = inputs(torch.float16, B=1, T=3001, d_in=128, d_out=64, k_in=64, k_out=64)
    assert cuda.project_token_splits(3001, 1, torch.cuda.get_device_properties(0).multi_processor_count)[0] > 1
    assert rel_err(kernel(A, G, P_in, P_out, mask), reference(A, G, P_in, P_out, mask)) <= TOL[torch.float16]


@gpu
def test_strided_and_misaligned_inputs(kernel, poisoned):
    A, G, P_in, P_out, mask = inputs(torch.float32, B=2, T=65, d_in=40, d_out=48, k_in=24, k_out=32)
    A_t = A.transpose(0, 1).contiguous().transpose(0, 1)  # batch stride d_in, token stride B * d_in
    G_s = G[:, :, ::2]  # a d stride of 2 is copied to unit stride
    A_off = torch.cat([A.new_zeros(1), A.flatten()])[1:].view_as(A)  # 4 bytes past a 16-byte boundary
    ref = reference(A, G_s, P_in, P_out[::2], mask)
    assert not cuda.vector_rows(A_off)
    assert rel_err(kernel(A_t, G_s, P_in, P_out[::2], mask), ref) <= TOL[torch.float32]
    assert rel_err(kernel(A_off, G_s, P_in, P_out[::2], mask), ref) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@gpu
def test_llama_layer_shapes(kernel, dtype, poisoned):
    # Up projection of Llama-3-8B at k = 64, the shape the kernel is built for.
    A, G, P_in, P_out, mask = inputs(dtype, B=2, T=300, d_in=4096, d_out=14336, k_in=64, k_out=64, bias=False)
    assert rel_err(kernel(A, G, P_in, P_out, mask), reference(A, G, P_in, P_out, mask)) <= TOL[dtype]


@gpu
def test_uncovered_cases_run_on_the_reference(kernel):
    from fastinfluence import ops

    A, G, P_in, P_out, mask = inputs(torch.float64, B=2, T=9, d_in=12, d_out=8, k_in=4, k_out=130)
    A32, G16 = A.float(), G.half()
    for args in ((A, G, P_in, P_out, mask), (A32, G16, P_in, P_out, mask), (A32, G.float(), P_in, None, mask)):
        assert isinstance(cuda.supports_project(A=args[0], G=args[1], P_in=args[2], P_out=args[3]), str)
        with ops.use_backend("cuda"), ops.trace() as ran:
            out = ops.project(*args)
        assert torch.equal(out, project_reference(*args)) and [d.backend for d in ran] == ["torch"]


# --------------------------------------------------------------------------- on the CPU


def test_rank_tile_is_the_smallest_that_holds_both_ranks():
    assert [cuda.project_rank_tile(k, 1) for k in (1, 32, 33, 64, 65, 128)] == [32, 32, 64, 64, 128, 128]
    assert cuda.project_rank_tile(16, 100) == 128
    assert cuda.project_rank_tile(129, 16) is None


@pytest.mark.parametrize(
    "T,B,n_sm",
    [(1, 1, 132), (64, 1, 132), (2048, 4, 132), (3001, 1, 132), (100, 500, 132), (10**7, 1, 132), (130, 2, 1)],
)
def test_token_splits_cover_every_token_once(T, B, n_sm):
    splits, per = cuda.project_token_splits(T, B, n_sm)
    assert per % cuda.PROJECT_TOKEN_TILE == 0 and 1 <= splits <= 65535
    assert (splits - 1) * per < T <= splits * per  # no empty split, nothing left over
    assert splits <= max(1, -(-2 * n_sm // B))  # about two CTAs per SM at most


def test_token_splits_fill_the_gpu_when_tokens_allow():
    assert cuda.project_token_splits(2048, 4, 132) == (32, 64)  # 4 x 32 CTAs for 264 CTA slots
    assert cuda.project_token_splits(2048, 300, 132) == (1, 2048)


def test_padded_projection_layout():
    P = torch.randn(11, 5)  # ten rows of d plus a bias row
    like = torch.empty(0, dtype=torch.bfloat16)
    out = cuda.padded_projection(P, 10, 32, like)
    assert out.shape == (10, 32) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out[:, :5], P[:10].to(torch.bfloat16))
    assert not out[:, 5:].any()


def test_vector_rows_needs_16_byte_rows_and_strides():
    assert cuda.vector_rows(torch.randn(2, 3, 8))  # 32-byte rows
    assert not cuda.vector_rows(torch.randn(2, 3, 6))  # 24-byte rows
    assert cuda.vector_rows(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert not cuda.vector_rows(torch.randn(2, 3, 12, dtype=torch.bfloat16))
    assert not cuda.vector_rows(torch.randn(2, 3, 9)[:, :, :8])  # 36-byte token stride
    assert cuda.vector_rows(torch.randn(1, 3, 9)[:, :1, :8])  # a single row needs no stride


def test_cpu_tensors_are_not_covered():
    A, G, P_in, P_out, mask = inputs(torch.float32, B=2, T=7, d_in=6, d_out=5, k_in=3, k_out=4, device="cpu")
    assert isinstance(cuda.supports_project(A=A, G=G, P_in=P_in, P_out=P_out, mask=mask), str)
