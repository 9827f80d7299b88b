"""Cross-entropy of an LM head applied to hidden states, without the (N, V) logits.

    z = hidden @ weight^T (+ bias)                     (N, V), never held whole
    logits = softcap * tanh(z / softcap)               (when ``softcap`` is set, as Gemma 2)
    loss_n = lse_n - logits[n, labels_n],  lse_n = logsumexp(logits[n])   (0 where ignored)
    dloss_n/dz[n] = (softmax(logits[n]) - onehot(labels_n)) * dlogits/dz

Only labelled rows reach the head: ``linear_cross_entropy`` gathers the N_l rows whose label
is not ``ignore_index`` (prompt and padding are often half of the tokens), runs the head on
those, and scatters the loss back (0 elsewhere, and a zero hidden gradient there). Then one
of two paths, walking the rows in chunks that hold one (rows, V) block of logits at a time:

* **frozen head** (neither ``weight`` nor ``bias`` needs a gradient: extraction, LoRA): the
  forward computes per chunk the logits once, the loss, and the unit-weight input gradient
  dh_n = dloss_n/dz[n] @ W, and keeps dh (N_l, H). The backward only scales it,
  grad_hidden_n = grad_loss_n * dh_n, exact for any per-token upstream gradient (any sign:
  gradient ascent, NPO's per-example non-linear weights). 2 head matmuls.
* **trainable head**: the forward keeps only the per-token logsumexp; the backward
  recomputes each chunk's logits and applies the upstream gradient before the matmuls, as
  dW = sum_n grad_loss_n dz[n]^T h_n needs it. 4 head matmuls (3 without grad_weight).

Cost, for N_l labelled rows in chunks of r rows, s bytes per weight element:

    path                     FLOPs         weight reads (bytes)       logits block
    frozen head              4 N_l V H     2 ceil(N_l / r) V H s       r V x 4 (float32)
    trainable head           8 N_l V H     3 ceil(N_l / r) V H s       r V x 4
    before (all N rows)      6-8 N V H     3 ceil(N / r) V H s         r V x 4

plus a few elementwise passes over each block (max, one exp, the normalisation, the one-hot
subtraction), in place: one (rows, V) block at a time.
Saved for backward: dh (N_l, H) on the frozen path, hidden (N_l, H) + lse (N_l,) otherwise.

The chunked functions below are the ``torch`` backend and the reference the Triton kernels
(``fastinfluence.triton_kernels.linear_cross_entropy_{forward,backward,forward_grad}``) are
tested against.
"""

from __future__ import annotations

import math

import torch

from ._backend import dispatch, register_op
from ._common import acc_dtype

REDUCTIONS = ("none", "sum", "mean")

# Smallest logits block (elements) per chunk: every chunk reads the whole (V, H) weight, so
# tiny chunks would make the pass bound by re-reading it. 2^23 float32 = 32 MiB: at V = 151,936
# that is 55 rows, 110 FLOP per weight element read, still bound by the matmul on a CPU core;
# the block is most of extraction's memory above the model's activations.
MIN_CHUNK_ELEMENTS = 2**23
# What keeps a chunk matmul-bound is its rows (2 FLOP per weight element read per row): 64 rows
# are 128 FLOP per element. A smaller vocabulary needs no more rows than that, so its block is
# smaller (vocabulary 32,000: 64 rows, 8 MiB instead of 262 rows, 32 MiB).
MIN_CHUNK_ROWS = 64


def _chunk_rows(n: int, h: int, v: int) -> int:
    """Tokens per chunk: a logits block about the size of the hidden states (as Liger's FLCE),
    and at least MIN_CHUNK_ROWS rows or MIN_CHUNK_ELEMENTS elements, whichever is fewer rows."""
    return max(1, min(n, max(math.ceil(n * h / v), min(MIN_CHUNK_ROWS, MIN_CHUNK_ELEMENTS // v))))


def _chunk_logits(hidden, weight, bias, softcap, dtype):
    """Logits of one chunk in ``dtype``, and dlogits/dz (None without softcap).

    The matmul runs in the input dtype (as the model's own LM head does); softmax math in
    ``dtype`` (float32, or float64 for float64 inputs).
    """
    z = hidden @ weight.T
    if bias is not None:
        z += bias
    z = z.to(dtype)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, 1.0 - t * t


def _grad_logits_(logits, lse, labels, valid, scale, dcap):
    """dL/dz of one chunk, written over ``logits`` (rows, V): scale_n (softmax - onehot) * dlogits/dz.

    lse: (rows,) logsumexp of the logits; labels, valid: (rows,); scale: (rows,) per-token
    upstream gradient in the logits' dtype (rows that are not ``valid`` get 0).
    """
    return _grad_from_probs_(logits.sub_(lse.unsqueeze(1)).exp_(), labels, valid, scale, dcap)


def _grad_from_probs_(probs, labels, valid, scale, dcap):
    """``_grad_logits_`` from the chunk's softmax, written over ``probs``."""
    probs.scatter_add_(1, torch.where(valid, labels, 0).unsqueeze(1), -torch.ones_like(scale).unsqueeze(1))
    probs.mul_(torch.where(valid, scale, 0.0).unsqueeze(1))
    if dcap is not None:
        probs.mul_(dcap)
    return probs


def _chunk_loss_(logits, labels, valid):
    """(loss, lse) of one chunk, lse - target logit (0 where not ``valid``), with ``logits`` (rows, V)
    overwritten by their softmax: one block in memory and one exp per element (``torch.logsumexp``
    would hold a second block, and the gradient would exponentiate again)."""
    target = logits.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    top = logits.amax(1, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(1, keepdim=True)
    probs.div_(total)
    lse = (top + total.log()).squeeze(1)
    return torch.where(valid, lse - target, 0.0), lse


def linear_cross_entropy_forward(hidden, weight, bias, labels, ignore_index, softcap):
    """Per-token loss and logsumexp, chunk by chunk.

    Args:
        hidden: (N, H), weight: (V, H), bias: (V,) or None, all one float dtype.
        labels: (N,) int64; ``ignore_index`` marks tokens without loss.
        softcap: float or None.

    Returns:
        loss (N,) float32 (float64 for float64 inputs), 0 at ignored tokens; lse (N,) same dtype.
    """
    n, h = hidden.shape
    dtype = acc_dtype(hidden, weight)
    loss = torch.empty(n, dtype=dtype, device=hidden.device)
    lse = torch.empty(n, dtype=dtype, device=hidden.device)
    rows = _chunk_rows(n, h, weight.shape[0])
    for s in range(0, n, rows):
        logits, _ = _chunk_logits(hidden[s : s + rows], weight, bias, softcap, dtype)
        y = labels[s : s + rows]
        loss[s : s + rows], lse[s : s + rows] = _chunk_loss_(logits, y, y != ignore_index)
    return loss, lse


def linear_cross_entropy_forward_grad(hidden, weight, bias, labels, ignore_index, softcap, P_out=None, need_dh=True):
    """Per-token loss and its gradient in ``hidden`` at unit upstream weight, for a frozen head.

    One logits block per chunk gives both (2 head matmuls in all); the backward of
    sum_n grad_loss_n loss_n is then grad_loss_n * grad_hidden_n for any ``grad_loss``.

    Args:
        hidden, weight, bias, labels, ignore_index, softcap: as in ``linear_cross_entropy_forward``.
        P_out: (V, k_out) or None: also the projected output gradient (a captured head's G P_out).
        need_dh: form grad_hidden (else None: a captured head alone needs none).

    Returns:
        loss (N,) float32 (float64 for float64 inputs), 0 at ignored tokens;
        grad_hidden (N, H) in hidden.dtype, dloss_n/dhidden_n, 0 at ignored tokens (or None);
        given ``P_out``, a third: GP (N, k_out) float32 (float64) = dloss_n/dz_n @ P_out, 0 at ignored tokens.
    """
    loss, grad_hidden, GP = loss_and_grads(hidden, weight, bias, labels, ignore_index, softcap, P_out, need_dh)
    return (loss, grad_hidden) if P_out is None else (loss, grad_hidden, GP)


def loss_and_grads(hidden, weight, bias, labels, ignore_index, softcap, P_out=None, need_dh: bool = True):
    """The frozen head's walk over row chunks, one (rows, V) logits block each: per-token loss, the
    unit-weight input gradient dh = dloss/dz @ W (``need_dh``) and, given ``P_out`` (V, k_out), the
    projected output gradient dloss/dz @ P_out (what a captured head's features need).

    Returns:
        loss (N,) and GP (N, k_out) or None in float32 (float64 for float64 inputs); dh (N, H) in
        hidden.dtype or None; all 0 at ignored tokens. Under autocast each matmul's result is
        written into these dtypes.
    """
    n, h = hidden.shape
    dtype = acc_dtype(hidden, weight)
    P = P_out.to(dtype) if P_out is not None else None
    loss = torch.empty(n, dtype=dtype, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    GP = torch.empty(n, P.shape[1], dtype=dtype, device=hidden.device) if P is not None else None
    rows = _chunk_rows(n, h, weight.shape[0])
    for s in range(0, n, rows):
        logits, dcap = _chunk_logits(hidden[s : s + rows], weight, bias, softcap, dtype)
        y = labels[s : s + rows]
        valid = y != ignore_index
        loss_c, lse = _chunk_loss_(logits, y, valid)
        loss[s : s + rows] = loss_c.to(dtype)
        dz = _grad_from_probs_(logits, y, valid, torch.ones_like(lse), dcap)
        if GP is not None:
            GP[s : s + rows] = (dz @ P).to(dtype)
        if dh is not None:
            dh[s : s + rows] = (dz.to(weight.dtype) @ weight).to(dh.dtype)
    return loss, dh, GP


def linear_cross_entropy_backward(
    hidden, weight, bias, labels, lse, grad_loss, ignore_index, softcap, need_grad_weight, need_grad_bias
):
    """Gradients of sum_n grad_loss_n * loss_n, recomputing the logits chunk by chunk.

    Args:
        hidden, weight, bias, labels, ignore_index, softcap: as in the forward.
        lse: (N,) from the forward. grad_loss: (N,) float32, any sign.
        need_grad_weight, need_grad_bias: compute those gradients (else None is returned).

    Returns:
        grad_hidden (N, H) in hidden.dtype; grad_weight (V, H) in weight.dtype or None;
        grad_bias (V,) in bias.dtype or None. Weight and bias gradients accumulate in
        float32 (float64 for float64 inputs) across chunks.
    """
    n, h = hidden.shape
    dtype = acc_dtype(hidden, weight)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_grad_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_grad_bias else None
    rows = _chunk_rows(n, h, weight.shape[0])
    for s in range(0, n, rows):
        x = hidden[s : s + rows]
        logits, dcap = _chunk_logits(x, weight, bias, softcap, dtype)
        y = labels[s : s + rows]
        scale = grad_loss[s : s + rows].to(dtype)
        dz = _grad_logits_(logits, lse[s : s + rows].to(dtype), y, y != ignore_index, scale, dcap)
        grad_hidden[s : s + rows] = dz.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight.addmm_(dz.T, x.to(dtype))
        if grad_bias is not None:
            grad_bias.add_(dz.sum(0))
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


register_op("linear_cross_entropy_forward", linear_cross_entropy_forward)
register_op("linear_cross_entropy_forward_grad", linear_cross_entropy_forward_grad)
register_op("linear_cross_entropy_backward", linear_cross_entropy_backward)

# What the forward keeps for the backward (chosen by the caller, from what needs a gradient).
LOSS_ONLY, INPUT_GRAD, RECOMPUTE = "loss_only", "input_grad", "recompute"


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper; every op dispatches through the backend registry.

    ``path``: ``loss_only`` (no gradient wanted), ``input_grad`` (frozen head: dh computed in
    the forward, the backward scales it) or ``recompute`` (trainable head).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, path):
        args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, ignore_index=ignore_index, softcap=softcap)
        ctx.path, ctx.ignore_index, ctx.softcap = path, ignore_index, softcap
        if path == INPUT_GRAD:
            loss, grad_hidden = dispatch("linear_cross_entropy_forward_grad", hidden.device, **args)
            ctx.save_for_backward(grad_hidden)
            return loss
        loss, lse = dispatch("linear_cross_entropy_forward", hidden.device, **args)
        if path == RECOMPUTE:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.path == INPUT_GRAD:
            (unit,) = ctx.saved_tensors
            grad_hidden = (grad_loss.to(acc_dtype(unit)).unsqueeze(1) * unit).to(unit.dtype)
            return grad_hidden, None, None, None, None, None, None
        if ctx.path != RECOMPUTE:
            raise RuntimeError("linear_cross_entropy: no gradient was requested in the forward (torch.no_grad?)")
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = dispatch(
            "linear_cross_entropy_backward",
            hidden.device,
            hidden=hidden,
            weight=weight,
            bias=bias,
            labels=labels,
            lse=lse,
            grad_loss=grad_loss.contiguous().to(lse.dtype),
            ignore_index=ctx.ignore_index,
            softcap=ctx.softcap,
            need_grad_weight=ctx.needs_input_grad[1],
            need_grad_bias=bias is not None and ctx.needs_input_grad[2],
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _path(hidden, weight, bias) -> str:
    """Which forward: ``ctx.needs_input_grad`` is set under ``torch.no_grad`` too, so decide here."""
    if not torch.is_grad_enabled():
        return LOSS_ONLY
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return RECOMPUTE
    return INPUT_GRAD if hidden.requires_grad else LOSS_ONLY


def _check(hidden, weight, bias, labels, ignore_index, reduction, softcap):
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden (..., H) and weight (V, H) must share H, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels must have shape {tuple(hidden.shape[:-1])} (hidden without "
            f"its last dim), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one "
            "float dtype; cast the hidden states to the LM head's dtype"
        )
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(
            f"linear_cross_entropy: bias must be ({weight.shape[0]},) {weight.dtype}, got "
            f"{tuple(bias.shape)} {bias.dtype}"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be a positive float or None, got {softcap!r}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(
            f"linear_cross_entropy: labels must lie in [0, {weight.shape[0]}) or equal ignore_index "
            f"({ignore_index}); found {labels[bad][0].item()}"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "none",
    softcap: float | None = None,
) -> torch.Tensor:
    """Token cross-entropy of ``hidden @ weight^T (+ bias)`` without materialising the logits.

    The head runs on the labelled rows only (a head matmul costs 2 V H FLOPs per row); when
    neither ``weight`` nor ``bias`` needs a gradient the input gradient is formed in the
    forward pass, so the logits are computed once (see the module docstring).

    Args:
        hidden: (..., H) float (float32, bfloat16, float16 or float64).
        weight: (V, H), same dtype as ``hidden`` (the LM head; tied embeddings work as is).
        labels: (...) integer class ids; ``ignore_index`` tokens get loss 0 and no gradient.
        bias: (V,) or None.
        reduction: ``none`` (per-token loss, shape of ``labels``), ``sum``, or ``mean`` over
            the tokens that are not ignored (NaN when all are, as ``F.cross_entropy``).
        softcap: final-logit soft-capping, logits = softcap * tanh(z / softcap), or None.

    Returns:
        float32 loss (float64 for float64 inputs). Differentiable in ``hidden``, ``weight``
        and ``bias``; any upstream gradient per token (negative included) is applied exactly.
        With no labelled token the head is not run: the loss is 0 and gradients are 0.
    """
    _check(hidden, weight, bias, labels, ignore_index, reduction, softcap)
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).long()
    labelled = labels != ignore_index
    count = labelled.sum()
    rows = None if bool(labelled.all()) else labelled.nonzero().squeeze(1)
    if rows is not None:
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    path = _path(hidden, weight, bias)
    loss = LinearCrossEntropyFunction.apply(hidden.contiguous(), weight, bias, labels, ignore_index, softcap, path)
    if rows is not None:
        loss = loss.new_zeros(shape.numel()).index_copy(0, rows, loss)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / count
    return loss.reshape(shape)
