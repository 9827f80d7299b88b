"""The LM head's output gradient, projected, without any backward.

For logits z = hidden @ weight^T (+ bias) (optionally softcapped) and a loss
sum_n w_n * CE(logits_n, y_n), the gradient at the head's output is exactly

    G[n] = w_n * (softmax(logits_n) - onehot(y_n)) * dlogits/dz     (0 where y_n is ignored)

so the head's factorised feature needs only G P_out (N, k_out), which is computed here chunk
by chunk over the labelled tokens (ignored rows are 0 without touching the head): one
(rows, V) block of logits at a time, as in ``linear_cross_entropy``, never the (N, V) matrix.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype
from .linear_cross_entropy import _chunk_logits, _chunk_rows, _grad_logits_


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
    dtype = acc_dtype(hidden, weight)
    P = P_out.to(dtype)
    out = torch.zeros(hidden.shape[0], P.shape[1], dtype=dtype, device=hidden.device)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    hidden, labels, token_weights = hidden[rows], labels[rows], token_weights[rows].to(dtype)
    n, h = hidden.shape
    chunk = _chunk_rows(n, h, weight.shape[0])
    for s in range(0, n, chunk):
        logits, dcap = _chunk_logits(hidden[s : s + chunk], weight, bias, softcap, dtype)
        y = labels[s : s + chunk]
        lse = torch.logsumexp(logits, dim=-1)
        dz = _grad_logits_(logits, lse, y, torch.ones_like(y, dtype=torch.bool), token_weights[s : s + chunk], dcap)
        out[rows[s : s + chunk]] = dz @ P
    return out
