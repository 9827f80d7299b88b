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

from ._backend import dispatch
from ._common import acc_dtype


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
    loss_l, dh_l, GP_l = dispatch(
        "linear_cross_entropy_forward_grad",
        hidden.device,
        hidden=hidden[rows],
        weight=weight,
        bias=bias,
        labels=labels[rows],
        ignore_index=ignore_index,
        softcap=softcap,
        P_out=P_out,
        need_dh=need_dh,
    )
    n = hidden.shape[0]
    loss = loss_l.new_zeros(n).index_copy_(0, rows, loss_l)
    GP = GP_l.new_zeros(n, GP_l.shape[1]).index_copy_(0, rows, GP_l)  # float32 on Triton, float64 for float64
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


# ---------------------------------------------------------------------------------------
# Exact products of the captured head's gradients, without its (B, T, V) output gradient
# ---------------------------------------------------------------------------------------

# Logits elements per vocabulary chunk of the head's ghost products (2^22 float64 = 32 MiB).
GHOST_CHUNK_ELEMENTS = 2**22


class HeadGrad:
    """The captured LM head's output gradient G (B, T, V) of a batch, described, never formed:

        G[b, t] = scale_b * (softmax(logits_bt) - onehot(y_bt)) * dlogits/dz     (0 where y_bt is ignored)

    ``labels``: (B, T) shifted labels (``ignore_index`` where no loss); ``scale``: (B,) each
    example's loss weight (1 / its answer tokens for the per-example mean loss); the head's
    ``weight`` (V, H), ``bias`` and ``softcap`` as in ``linear_cross_entropy``. What the capture
    pass hands to ``on_layer`` for the head when asked for the head's factors
    (``CapturePass.backward(head_grad=True)``); ``head_ghost_dot`` / ``head_ghost_norm`` take
    the exact products from it chunk by chunk over the vocabulary."""

    def __init__(self, labels, scale, weight, bias=None, softcap=None, ignore_index: int = -100):
        self.labels, self.scale, self.weight, self.bias = labels, scale, weight, bias
        self.softcap, self.ignore_index = softcap, ignore_index

    def tokens(self, A: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> HeadTokens:
        """The labelled tokens (where ``mask`` is set, when given) of ``A`` (B, T, H), the head's input."""
        keep = self.labels != self.ignore_index
        if mask is not None:
            keep = keep & mask.bool()
        b, t = keep.nonzero(as_tuple=True)
        h = A[b, t].to(dtype)
        y = self.labels[b, t]
        lse = _lse(h, self.weight, self.bias, self.softcap, dtype)
        return HeadTokens(h, b, y, lse, self.scale.to(dtype)[b])


class HeadTokens:
    """A batch's labelled tokens for the head's ghost products: inputs h (n, H), example of each (n,),
    label (n,), logsumexp of the logits (n,) and loss weight (n,), in the products' dtype."""

    def __init__(self, h, example, y, lse, scale):
        self.h, self.example, self.y, self.lse, self.scale = h, example, y, lse, scale

    def __len__(self) -> int:
        return self.h.shape[0]


def _vocab_chunk(n: int, v: int) -> int:
    return max(1, min(v, GHOST_CHUNK_ELEMENTS // max(1, n)))


def _chunk_z(h, weight, bias, softcap, lo, hi, dtype):
    """Logits of vocabulary columns lo:hi in ``dtype`` and dlogits/dz (None without softcap)."""
    z = h @ weight[lo:hi].to(dtype).T
    if bias is not None:
        z += bias[lo:hi].to(dtype)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, 1.0 - t * t


def _lse(h, weight, bias, softcap, dtype):
    """logsumexp of each row's logits, over vocabulary chunks (never (n, V))."""
    n, V = h.shape[0], weight.shape[0]
    top = torch.full((n,), -torch.inf, dtype=dtype, device=h.device)
    total = torch.zeros(n, dtype=dtype, device=h.device)
    step = _vocab_chunk(n, V)
    for lo in range(0, V, step):
        z, _ = _chunk_z(h, weight, bias, softcap, lo, min(V, lo + step), dtype)
        new = torch.maximum(top, z.amax(1))
        total = total * (top - new).exp() + (z - new[:, None]).exp().sum(1)
        top = new
    return top + total.log()


def _chunk_grad(tok: HeadTokens, weight, bias, softcap, lo, hi, dtype):
    """G of ``tok``'s rows on vocabulary columns lo:hi: scale (softmax - onehot) dlogits/dz."""
    z, dcap = _chunk_z(tok.h, weight, bias, softcap, lo, hi, dtype)
    g = z.sub_(tok.lse[:, None]).exp_()
    inside = (tok.y >= lo) & (tok.y < hi)
    rows = inside.nonzero().squeeze(1)
    g[rows, tok.y[rows] - lo] -= 1.0
    g.mul_(tok.scale[:, None])
    if dcap is not None:
        g.mul_(dcap)
    return g


def head_token_products(q: HeadTokens, t: HeadTokens, head: HeadGrad, bias: bool) -> torch.Tensor:
    """(n_q, n_t): (a_q . a_t + bias) (g_q . g_t) for every pair of labelled tokens, g . g summed over
    vocabulary chunks (one (n_q + n_t, chunk) block of G at a time)."""
    dtype = q.h.dtype
    V = head.weight.shape[0]
    GG = torch.zeros(len(q), len(t), dtype=dtype, device=q.h.device)
    step = _vocab_chunk(len(q) + len(t), V)
    for lo in range(0, V, step):
        hi = min(V, lo + step)
        gq = _chunk_grad(q, head.weight, head.bias, head.softcap, lo, hi, dtype)
        gt = gq if t is q else _chunk_grad(t, head.weight, head.bias, head.softcap, lo, hi, dtype)
        GG.addmm_(gq, gt.T)
    AA = q.h @ t.h.T
    if bias:
        AA += 1.0
    return AA.mul_(GG)


def head_ghost_dot(q: HeadTokens, Q: int, t: HeadTokens, B: int, head: HeadGrad, bias: bool) -> torch.Tensor:
    """(Q, B) exact inner products <grad W_q, grad W_i> of the head between the Q examples of ``q``
    and the B of ``t`` (``bias``: with the bias gradient), from their labelled tokens only."""
    M = head_token_products(q, t, head, bias)
    rows = M.new_zeros(Q, len(t)).index_add_(0, q.example, M)
    return rows.new_zeros(Q, B).index_add_(1, t.example, rows)


def head_ghost_norm(t: HeadTokens, B: int, head: HeadGrad, bias: bool) -> torch.Tensor:
    """(B,) squared norms ||grad W_i||^2 of the head's per-example gradients."""
    M = head_token_products(t, t, head, bias)
    same = t.example[:, None] == t.example[None, :]
    return M.new_zeros(B).index_add_(0, t.example, (M * same).sum(1))
