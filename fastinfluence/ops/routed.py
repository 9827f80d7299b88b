"""Per-example products of a routed layer (one MoE expert) from its ragged token set.

An expert sees only the tokens routed to it: n rows A (n, d_in), G (n, d_out) and each row's
example ``example`` (n,) in a batch of B. Example i's weight gradient is the sum over its rows,

    grad W_i = sum_{t: example_t = i} g_t a_t^T,

so every product below is a sum over tokens scattered into the examples' rows (``index_add_``):
no padding to a (B, T) grid, and an example none of whose tokens reaches the expert gets zeros.
With ``bias`` (or a P_in with a bias row) a constant 1 is appended to every a.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import GRADIENT_BUDGET, acc_dtype
from .project import project_side


def _check(A: torch.Tensor, G: torch.Tensor, example: torch.Tensor) -> None:
    if A.dim() != 2 or G.dim() != 2 or example.dim() != 1 or not (A.shape[0] == G.shape[0] == example.shape[0]):
        raise ValueError(
            f"routed factors must be A (n, d_in), G (n, d_out), example (n,); got {tuple(A.shape)}, "
            f"{tuple(G.shape)}, {tuple(example.shape)}"
        )


def _with_ones(A: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([A, A.new_ones(A.shape[0], 1)], dim=1) if bias else A


def _grouped(X: torch.Tensor, Y: torch.Tensor, example: torch.Tensor, B: int) -> torch.Tensor | None:
    """One grouped matmul over the examples' row segments when the rows come sorted by example and
    the CPU kernel takes the operands (float32 / bfloat16, rows a multiple of 16 bytes); else None."""
    grouped_mm = getattr(F, "grouped_mm", None)
    fits = X.dtype in (torch.float32, torch.bfloat16) and X.device.type == "cpu" and X.shape[0] > 0
    if grouped_mm is None or not fits or any(d * X.element_size() % 16 for d in (X.shape[1], Y.shape[1])):
        return None
    if not bool((example[1:] >= example[:-1]).all()):
        return None
    ends = torch.bincount(example, minlength=B).cumsum(0).to(torch.int32)
    return grouped_mm(X.contiguous().T, Y.contiguous(), offs=ends)


def segment_outer(X: torch.Tensor, Y: torch.Tensor, example: torch.Tensor, B: int) -> torch.Tensor:
    """(B, p, q): sum over rows t of example i of X_t^T Y_t, for X (n, p), Y (n, q).

    Rows sorted by example (as the capture hands them over) are one grouped matmul where the kernel
    takes them; otherwise outer products are formed a bounded number of rows at a time
    (``GRADIENT_BUDGET`` elements) and added into their examples.
    """
    grouped = _grouped(X, Y, example, B)
    if grouped is not None:
        return grouped
    p, q = X.shape[1], Y.shape[1]
    out = X.new_zeros(B, p, q)
    step = max(1, GRADIENT_BUDGET // max(p * q, 1))
    for s in range(0, X.shape[0], step):
        out.index_add_(0, example[s : s + step], X[s : s + step, :, None] * Y[s : s + step, None, :])
    return out


def project_routed(
    A: torch.Tensor,
    G: torch.Tensor,
    example: torch.Tensor,
    B: int,
    P_in: torch.Tensor | None,
    P_out: torch.Tensor | None,
) -> torch.Tensor:
    """Projected per-example gradients of a routed layer.

    Args:
        A: (n, d_in) inputs of the routed tokens; G: (n, d_out) their output gradients.
        example: (n,) int64, each token's example in [0, B).
        P_in: (d_in, k_in) or (d_in + 1, k_in) with a bias row; None for identity.
        P_out: (d_out, k_out); None for identity.

    Returns:
        phi: (B, k_out, k_in) = sum_t (g_t P_out)^T (a_t P_in) per example, float32 (float64 for
        float64 inputs).
    """
    _check(A, G, example)
    dtype = acc_dtype(A, G)
    return segment_outer(project_side(G, P_out, dtype), project_side(A, P_in, dtype), example, B)


def gradients_routed(A: torch.Tensor, G: torch.Tensor, example: torch.Tensor, B: int, bias: bool) -> torch.Tensor:
    """(B, d_out * (d_in + bias)) flattened per-example gradients [grad W | grad b] of a routed layer."""
    _check(A, G, example)
    dtype = acc_dtype(A, G)
    return segment_outer(G.to(dtype), _with_ones(A.to(dtype), bias), example, B).view(B, -1)


def _kernel(A1, G1, A2, G2, bias: bool) -> torch.Tensor:
    """(n1, n2) token products (a_t . a_s + bias)(g_t . g_s)."""
    KA = A1 @ A2.T
    if bias:
        KA = KA + 1.0
    return KA * (G1 @ G2.T)


def ghost_dot_routed(
    A1: torch.Tensor,
    G1: torch.Tensor,
    example1: torch.Tensor,
    B1: int,
    A2: torch.Tensor,
    G2: torch.Tensor,
    example2: torch.Tensor,
    B2: int,
    bias: bool = False,
) -> torch.Tensor:
    """(B1, B2) exact <grad W_i, grad W_j>_F of a routed layer between two sets of examples:
    sum over token pairs (t of i, s of j) of (a_t . a_s)(g_t . g_s), float32 (float64 for float64
    inputs). Token rows of the first set are taken a bounded number at a time."""
    _check(A1, G1, example1)
    _check(A2, G2, example2)
    dtype = acc_dtype(A1, G1, A2, G2)
    A1, G1, A2, G2 = (X.to(dtype) for X in (A1, G1, A2, G2))
    rows = A1.new_zeros(B1, A2.shape[0])
    step = max(1, GRADIENT_BUDGET // max(A2.shape[0], 1))
    for s in range(0, A1.shape[0], step):
        rows.index_add_(0, example1[s : s + step], _kernel(A1[s : s + step], G1[s : s + step], A2, G2, bias))
    return A1.new_zeros(B1, B2).index_add_(1, example2, rows)


def ghost_norm_routed(
    A: torch.Tensor, G: torch.Tensor, example: torch.Tensor, B: int, bias: bool = False
) -> torch.Tensor:
    """(B,) squared per-example gradient norms ||grad W_i||_F^2 of a routed layer (token pairs of
    the same example only), float32 (float64 for float64 inputs)."""
    _check(A, G, example)
    dtype = acc_dtype(A, G)
    A, G = A.to(dtype), G.to(dtype)
    out = A.new_zeros(B)
    step = max(1, GRADIENT_BUDGET // max(A.shape[0], 1))
    for s in range(0, A.shape[0], step):
        same = example[s : s + step, None] == example[None, :]
        K = torch.where(same, _kernel(A[s : s + step], G[s : s + step], A, G, bias), 0.0)
        out.index_add_(0, example[s : s + step], K.sum(1))
    return out


def token_grid(
    A: torch.Tensor, G: torch.Tensor, example: torch.Tensor, B: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A routed layer's rows laid out per example, as a token-wise layer's factors are.

    Returns (A (B, T, d_in), G (B, T, d_out), mask (B, T)), T the most rows one example has:
    example i's rows in their order, then zero rows masked out (an example with no row is all
    padding). Every per-example quantity of the token-wise layers (covariance sums, per-example
    gradients sum_t g_t a_t^T, their products) then holds for the routed layer unchanged.
    """
    _check(A, G, example)
    counts = torch.bincount(example, minlength=B)
    T = int(counts.max()) if len(example) else 0
    order = torch.argsort(example, stable=True)
    ex = example[order]
    pos = torch.arange(len(ex), device=ex.device) - (counts.cumsum(0) - counts)[ex]
    grids = []
    for X in (A, G):
        grid = X.new_zeros(B, T, X.shape[1])
        grid[ex, pos] = X[order]
        grids.append(grid)
    mask = torch.zeros(B, T, dtype=torch.bool, device=A.device)
    mask[ex, pos] = True
    return grids[0], grids[1], mask
