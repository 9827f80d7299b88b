"""Cross-entropy of an LM head applied to hidden states, without the (N, V) logits.

    z = hidden @ weight^T (+ bias)                     (N, V), never held whole
    logits = softcap * tanh(z / softcap)               (when ``softcap`` is set, as Gemma 2)
    loss_n = lse_n - logits[n, labels_n],  lse_n = logsumexp(logits[n])   (0 where ignored)

The forward pass walks the tokens in chunks and keeps only the per-token logsumexp. The
backward pass recomputes each chunk's logits and applies the upstream gradient per token,
whatever its sign or magnitude (gradient ascent and per-example weights are expressed
that way):

    dL/dz[n] = grad_loss_n * (softmax(logits[n]) - onehot(labels_n)) * dlogits/dz

The chunked functions below are the ``torch`` backend and the reference the Triton
kernels (``fastinfluence.triton_kernels.linear_cross_entropy_{forward,backward}``) are
tested against; they hold at most one (rows, V) block of logits at a time.
"""

from __future__ import annotations

import math

import torch

from ._backend import dispatch, register_op
from ._common import acc_dtype

REDUCTIONS = ("none", "sum", "mean")

# Smallest logits block (elements) per chunk: every chunk reads the whole (V, H) weight, so
# tiny chunks would make the pass bound by re-reading it. 2^24 float32 = 64 MiB.
MIN_CHUNK_ELEMENTS = 2**24


def _chunk_rows(n: int, h: int, v: int) -> int:
    """Tokens per chunk: a logits block about the size of the hidden states (as Liger's FLCE),
    and at least MIN_CHUNK_ELEMENTS."""
    return max(1, min(n, max(math.ceil(n * h / v), MIN_CHUNK_ELEMENTS // v)))


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
        valid = y != ignore_index
        lse_c = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        lse[s : s + rows] = lse_c
        loss[s : s + rows] = torch.where(valid, lse_c - target, 0.0)
    return loss, lse


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
        valid = y != ignore_index
        scale = torch.where(valid, grad_loss[s : s + rows].to(dtype), 0.0)
        dz = logits.sub_(lse[s : s + rows].to(dtype).unsqueeze(1)).exp_()  # softmax, in place
        dz.scatter_add_(1, torch.where(valid, y, 0).unsqueeze(1), -torch.ones_like(scale).unsqueeze(1))
        dz.mul_(scale.unsqueeze(1))
        if dcap is not None:
            dz.mul_(dcap)
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
register_op("linear_cross_entropy_backward", linear_cross_entropy_backward)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper; forward and backward each dispatch through the backend registry."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap):
        loss, lse = dispatch(
            "linear_cross_entropy_forward",
            hidden.device,
            hidden=hidden,
            weight=weight,
            bias=bias,
            labels=labels,
            ignore_index=ignore_index,
            softcap=softcap,
        )
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
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
        return grad_hidden, grad_weight, grad_bias, None, None, None


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
    """
    _check(hidden, weight, bias, labels, ignore_index, reduction, softcap)
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    labels = labels.reshape(-1).long()
    loss = LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, ignore_index, softcap)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (labels != ignore_index).sum()
    return loss.reshape(shape)
