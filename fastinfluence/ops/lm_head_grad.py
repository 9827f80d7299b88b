"""The LM head's output gradient, projected, without any backward.

For logits z = hidden @ weight^T (+ bias) (optionally softcapped) and a loss
sum_n w_n * CE(logits_n, y_n), the gradient at the head's output is exactly

    G[n] = w_n * (softmax(logits_n) - onehot(y_n)) * dlogits/dz     (0 where y_n is ignored)

so the head's factorised feature needs only G P_out (N, k_out), which is computed here chunk
by chunk over the tokens: one (rows, V) block of logits at a time, as in
``linear_cross_entropy``, never the (N, V) matrix.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype
from .linear_cross_entropy import _chunk_logits, _chunk_rows


def lm_head_grad_projected(hidden, weight, labels, token_weights, P_out, bias=None, softcap=None, ignore_index=-100):
    """G P_out for the LM head, from a forward pass only.

    Args:
        hidden: (N, H) head inputs; weight: (V, H); bias: (V,) or None.
        labels: (N,) int64 targets, ``ignore_index`` where a token carries no loss.
        token_weights: (N,) dL/dloss_n (1 / answer tokens of its example for a per-example mean).
        P_out: (V, k_out) output-side projection.
        softcap: as in ``linear_cross_entropy``.

    Returns:
        (N, k_out) in float32 (float64 for float64 inputs); rows of ignored tokens are 0.
    """
    n, h = hidden.shape
    dtype = acc_dtype(hidden, weight)
    P = P_out.to(dtype)
    out = torch.empty(n, P.shape[1], dtype=dtype, device=hidden.device)
    rows = _chunk_rows(n, h, weight.shape[0])
    for s in range(0, n, rows):
        logits, dcap = _chunk_logits(hidden[s : s + rows], weight, bias, softcap, dtype)
        y = labels[s : s + rows]
        valid = y != ignore_index
        scale = torch.where(valid, token_weights[s : s + rows].to(dtype), 0.0)
        dz = torch.softmax(logits, dim=-1)
        dz.scatter_add_(1, torch.where(valid, y, 0).unsqueeze(1), -torch.ones_like(scale).unsqueeze(1))
        dz.mul_(scale.unsqueeze(1))
        if dcap is not None:
            dz.mul_(dcap)
        out[s : s + rows] = dz @ P
    return out
