"""The LM head's loss, input gradient and projected output gradient in one walk over the vocabulary.

For logits z = hidden @ weight^T (+ bias) (optionally softcapped) and a loss
sum_n w_n * CE(logits_n, y_n), the gradient at the head's output is exactly

    G[n] = w_n * (softmax(logits_n) - onehot(y_n)) * dlogits/dz     (0 where y_n is ignored)

so the head's factorised feature needs only G P_out (N, k_out), which is computed here chunk
by chunk over the labelled tokens (ignored rows are 0 without touching the head): one
(rows, V) block of logits at a time, as in ``linear_cross_entropy``, never the (N, V) matrix.
The same blocks give the loss and its input gradient for the blocks below the head (no
recompute in the backward): ``head_loss_projected``, used by the capture pass when the head
is captured (alone or beside other layers); w_n is applied by the caller (G and dh are formed
at unit weight).
"""

from __future__ import annotations

import torch

from ._common import acc_dtype
from .linear_cross_entropy import _chunk_logits, _chunk_loss_, _chunk_rows, _grad_from_probs_


def lm_head_loss_grad_projected(
    hidden, weight, labels, P_out, bias=None, softcap=None, ignore_index=-100, need_dh: bool = True
):
    """Per-token loss, its unit-weight input gradient and its unit-weight projected output gradient
    of the LM head, in one walk over the labelled rows: 2 head matmuls plus (rows, V) x (V, k_out).

    What extraction needs when the head is captured beside other layers: the loss to
    backpropagate into the blocks below (through dh, never recomputed), and the head's own
    G P_out for its factorised feature (no B x T x V output gradient is ever held).

    Args:
        hidden: (N, H) head inputs; weight: (V, H); bias: (V,) or None; labels: (N,) int64.
        P_out: (V, k_out) output-side projection; softcap: as in ``linear_cross_entropy``.
        need_dh: form dh (one head matmul); without it dh is None.

    Returns:
        loss (N,), dh (N, H) = dloss_n / dhidden_n in hidden.dtype, GP (N, k_out) = dloss_n / dz_n
        @ P_out; loss and GP float32 (float64 for float64 inputs); all 0 at ignored rows.
    """
    dtype = acc_dtype(hidden, weight)
    P = P_out.to(dtype)
    n_all = hidden.shape[0]
    loss = torch.zeros(n_all, dtype=dtype, device=hidden.device)
    dh = torch.zeros_like(hidden) if need_dh else None
    GP = torch.zeros(n_all, P.shape[1], dtype=dtype, device=hidden.device)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    x, y_all = hidden[rows], labels[rows]
    n, h = x.shape
    chunk = _chunk_rows(n, h, weight.shape[0])
    for s in range(0, n, chunk):
        logits, dcap = _chunk_logits(x[s : s + chunk], weight, bias, softcap, dtype)
        y = y_all[s : s + chunk]
        valid = torch.ones_like(y, dtype=torch.bool)
        loss_c, lse = _chunk_loss_(logits, y, valid)
        dz = _grad_from_probs_(logits, y, valid, torch.ones_like(lse), dcap)
        r = rows[s : s + chunk]
        # Under autocast the matmuls come back in its dtype: written into the accumulators' own.
        loss[r], GP[r] = loss_c.to(dtype), (dz @ P).to(dtype)
        if dh is not None:
            dh[r] = (dz.to(weight.dtype) @ weight).to(dh.dtype)
    return loss, dh, GP


class HeadLossProjected(torch.autograd.Function):
    """``lm_head_loss_grad_projected`` with autograd through ``hidden``: the backward scales the dh
    of the forward by each token's upstream gradient (exact for any upstream; the head is frozen).
    ``GP`` is a side output without gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, P_out, softcap, ignore_index):
        # Grad mode is off inside forward: whether dh is wanted was decided by ``head_loss_projected``.
        need_dh = ctx.needs_input_grad[0]
        loss, dh, GP = lm_head_loss_grad_projected(hidden, weight, labels, P_out, bias, softcap, ignore_index, need_dh)
        if dh is not None:
            ctx.save_for_backward(dh)
        ctx.mark_non_differentiable(GP)
        return loss, GP

    @staticmethod
    def backward(ctx, grad_loss, _grad_gp):
        (dh,) = ctx.saved_tensors
        grad_hidden = (grad_loss.to(acc_dtype(dh)).unsqueeze(1) * dh).to(dh.dtype)
        return grad_hidden, None, None, None, None, None, None


def head_loss_projected(hidden, weight, labels, P_out, bias=None, softcap=None, ignore_index=-100):
    """(loss (N,), GP (N, k_out)) of ``lm_head_loss_grad_projected``, the loss differentiable in
    ``hidden`` (when it requires grad under grad mode: else dh is never formed). The head's weight
    and bias get no gradient (a captured head is frozen)."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return HeadLossProjected.apply(hidden, weight, bias, labels, P_out, softcap, ignore_index)
    with torch.no_grad():
        loss, _, GP = lm_head_loss_grad_projected(hidden, weight, labels, P_out, bias, softcap, ignore_index, False)
    return loss, GP
