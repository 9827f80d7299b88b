"""Exact inner products of per-example Linear gradients from their factors ("ghost" products).

    <grad W_i, grad W_j>_F = sum_{t,s} (a_it . a_js)(g_it . g_js) = 1^T ((A_i A_j^T) * (G_i G_j^T)) 1

With ``bias=True`` a constant 1 is appended to every a, so a_it . a_js becomes
a_it . a_js + 1 and the product also covers the bias gradient. Cheaper than forming the
gradients when T_i T_j (d_in + d_out) < d_in d_out.
"""

from __future__ import annotations

import torch

from ._backend import dispatch, register_op
from ._common import acc_dtype, check_tokens, masked

# Rows of the first operand per step of the reference, so its (b, B2, T1, T2) temporaries
# stay bounded.
_REF_ROWS = 8


def ghost_dot_reference(A1, G1, A2, G2, mask1=None, mask2=None, bias=False):
    dtype = acc_dtype(A1, G1, A2, G2)
    A1, G1 = masked(A1.to(dtype), mask1), masked(G1.to(dtype), mask1)
    A2, G2 = masked(A2.to(dtype), mask2), masked(G2.to(dtype), mask2)
    out = torch.empty(A1.shape[0], A2.shape[0], dtype=dtype, device=A1.device)
    for s in range(0, A1.shape[0], _REF_ROWS):
        KA = torch.einsum("btd,csd->bcts", A1[s : s + _REF_ROWS], A2)
        if bias:
            KA = KA + 1.0
        KG = torch.einsum("btd,csd->bcts", G1[s : s + _REF_ROWS], G2)
        out[s : s + _REF_ROWS] = (KA * KG).sum(dim=(-1, -2))
    return out


register_op("ghost_dot", ghost_dot_reference)


def ghost_dot(
    A1: torch.Tensor,
    G1: torch.Tensor,
    A2: torch.Tensor,
    G2: torch.Tensor,
    mask1: torch.Tensor | None = None,
    mask2: torch.Tensor | None = None,
    bias: bool = False,
) -> torch.Tensor:
    """Exact gradient inner products between two sets of examples of one layer.

    Args:
        A1: (B1, T1, d_in), G1: (B1, T1, d_out), mask1: (B1, T1) bool or None.
        A2: (B2, T2, d_in), G2: (B2, T2, d_out), mask2: (B2, T2) bool or None.
        bias: append a constant 1 to a (include the bias gradient).

    Returns:
        (B1, B2) float32 (float64 when an input is float64): <grad W_i, grad W_j>_F.
    """
    check_tokens("A1", A1, mask1)
    check_tokens("G1", G1, mask1)
    check_tokens("A2", A2, mask2)
    check_tokens("G2", G2, mask2)
    if A1.shape[-1] != A2.shape[-1] or G1.shape[-1] != G2.shape[-1]:
        raise ValueError(
            f"ghost_dot: feature widths differ: A1 {tuple(A1.shape)}, A2 {tuple(A2.shape)}, "
            f"G1 {tuple(G1.shape)}, G2 {tuple(G2.shape)}"
        )
    return dispatch("ghost_dot", A1.device, A1=A1, G1=G1, A2=A2, G2=G2, mask1=mask1, mask2=mask2, bias=bias)


def ghost_norm_reference(A, G, mask=None, bias=False):
    dtype = acc_dtype(A, G)
    A, G = masked(A.to(dtype), mask), masked(G.to(dtype), mask)
    KA = A @ A.transpose(1, 2)
    if bias:
        KA = KA + 1.0
    return (KA * (G @ G.transpose(1, 2))).sum(dim=(-1, -2))


register_op("ghost_norm", ghost_norm_reference)


def ghost_norm(A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None = None, bias: bool = False) -> torch.Tensor:
    """Squared Frobenius norms ||grad W_i||_F^2 of per-example gradients, (B,).

    Squared, so that norms over several layers add. A: (B, T, d_in), G: (B, T, d_out).
    """
    check_tokens("A", A, mask)
    check_tokens("G", G, mask)
    return dispatch("ghost_norm", A.device, A=A, G=G, mask=mask, bias=bias)
