"""Factorised per-example projection of a Linear layer's gradient.

For example i with token inputs A_i (T, d_in) and output gradients G_i (T, d_out), the
per-example weight gradient is grad W_i = G_i^T A_i (d_out, d_in). Its projection is

    phi_i = P_out^T grad W_i P_in = (G_i P_out)^T (A_i P_in)      (k_out, k_in)

computed without ever forming grad W_i. ``P_in`` may carry one extra row: the bias row,
i.e. a constant 1 appended to every a (so phi also covers the bias gradient).
``None`` for a projection matrix means the identity (that side is kept exact).
"""

from __future__ import annotations

import torch

from ._backend import dispatch, register_op
from ._common import acc_dtype, check_tokens, masked


def _check(A, G, P_in, P_out, mask):
    check_tokens("A", A, mask)
    check_tokens("G", G, mask)
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} must share (B, T)")
    if P_in is not None and P_in.shape[0] not in (A.shape[-1], A.shape[-1] + 1):
        raise ValueError(
            f"P_in has {P_in.shape[0]} rows; A has d_in={A.shape[-1]} (expected d_in, or d_in + 1 with a bias row)"
        )
    if P_out is not None and P_out.shape[0] != G.shape[-1]:
        raise ValueError(f"P_out has {P_out.shape[0]} rows; G has d_out={G.shape[-1]}")


def project_side(X: torch.Tensor, P: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """X @ P in ``dtype``; a P with one row more than X's width holds the bias row."""
    X = X.to(dtype)
    if P is None:
        return X
    P = P.to(dtype)
    d = X.shape[-1]
    if P.shape[0] == d + 1:
        return X @ P[:d] + P[d]
    return X @ P


def project_reference(A, G, P_in, P_out, mask=None):
    At, Gt = project_tokens_reference(A, G, P_in, P_out, mask)
    return Gt.transpose(1, 2) @ At


register_op("project", project_reference)


def project(
    A: torch.Tensor,
    G: torch.Tensor,
    P_in: torch.Tensor | None,
    P_out: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected per-example gradients of one layer.

    Args:
        A: (B, T, d_in) layer inputs, float32/bfloat16/float16/float64.
        G: (B, T, d_out) gradients of the loss w.r.t. the layer outputs, same dtype family.
        P_in: (d_in, k_in) or (d_in + 1, k_in) with a bias row; None for identity.
        P_out: (d_out, k_out); None for identity.
        mask: (B, T) bool, True for tokens that count; None for all.

    Returns:
        phi: (B, k_out, k_in) in float32 (float64 when an input is float64).
    """
    _check(A, G, P_in, P_out, mask)
    return dispatch("project", A.device, A=A, G=G, P_in=P_in, P_out=P_out, mask=mask)


def project_tokens_reference(A, G, P_in, P_out, mask=None, out_dtype=None):
    dtype = acc_dtype(A, G)
    At = masked(project_side(A, P_in, dtype), mask)
    Gt = masked(project_side(G, P_out, dtype), mask)
    if out_dtype is not None:
        At, Gt = At.to(out_dtype), Gt.to(out_dtype)
    return At, Gt


register_op("project_tokens", project_tokens_reference)


def project_tokens(
    A: torch.Tensor,
    G: torch.Tensor,
    P_in: torch.Tensor | None,
    P_out: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token projected factors A~ = A P_in (B, T, k_in) and G~ = G P_out (B, T, k_out).

    Masked tokens are zero. Computed in float32 (float64 for float64 inputs) and cast to
    ``out_dtype`` when given. sum_t G~_t^T A~_t equals ``project``'s phi.
    """
    _check(A, G, P_in, P_out, mask)
    return dispatch("project_tokens", A.device, A=A, G=G, P_in=P_in, P_out=P_out, mask=mask, out_dtype=out_dtype)
