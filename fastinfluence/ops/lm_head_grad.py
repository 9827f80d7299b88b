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
from .linear_cross_entropy import loss_and_grads


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
    # Only labelled rows reach the head; the others stay 0 (ignored rows cost nothing).
    rows = (labels != ignore_index).nonzero().squeeze(1)
    loss_l, dh_l, GP_l = loss_and_grads(
        hidden[rows], weight, bias, labels[rows], ignore_index, softcap, P_out=P_out, need_dh=need_dh
    )
    n = hidden.shape[0]
    loss = loss_l.new_zeros(n).index_copy_(0, rows, loss_l)
    GP = GP_l.new_zeros(n, GP_l.shape[1]).index_copy_(0, rows, GP_l)
    dh = torch.zeros_like(hidden).index_copy_(0, rows, dh_l) if dh_l is not None else None
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
