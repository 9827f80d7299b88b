"""Linear + cross-entropy without the (N, V) logits: the two backend functions of
``fastinfluence.ops.linear_cross_entropy``.

Tokens go in chunks of ``rows``. For each chunk the logits block z = hidden_c @ weight^T
comes from the library matmul in the inputs' dtype (as the model's own LM head computes
it); a Triton kernel then walks each row once in float32:

* forward: bias, soft-capping, an online logsumexp and the target logit -> loss and lse;
  nothing of the block is kept.
* backward: dL/dz = grad_loss * (softmax - onehot) * dlogits/dz, written over the block in
  place; then grad_hidden_c = dz @ weight and grad_weight += dz^T @ hidden_c (the matmul
  accumulates in float32; the running sum is kept in weight.dtype, one rounding per chunk).

Peak extra memory is one (rows, V) block, against the (N, V) float32 logits, softmax and
gradient of the materialised path. float64 runs on the torch path of the op module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, KERNEL_DTYPES

# Bytes of one chunk's logits block: large chunks keep the matmuls efficient and the
# number of read-modify-writes of grad_weight small.
_CHUNK_BYTES = 512 * 2**20


def _block_v(V: int) -> int:
    return min(64 if INTERPRET.value else 4096, triton.next_power_of_2(V))


@triton.jit
def _capped_logits(Z, Bias, v, v_ok, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, cap):
    """float32 logits of one block of a row (-inf past V) and dlogits/dz (1.0 without softcap)."""
    z = tl.load(Z + v, mask=v_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(Bias + v, mask=v_ok, other=0.0).to(tl.float32)
    dcap = tl.full(z.shape, 1.0, tl.float32)
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0)  # tanh(z / cap), finite for any z
        z = cap * t
        dcap = 1.0 - t * t
    return tl.where(v_ok, z, float("-inf")), dcap


@triton.jit
def _forward_kernel(
    Z,
    Bias,
    Labels,
    Loss,
    Lse,
    V,
    s_zn,
    ignore_index,
    cap,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Z += row * s_zn
    label = tl.load(Labels + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    target = tl.zeros((), tl.float32)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x, _ = _capped_logits(Z, Bias, v, v < V, SOFTCAP, HAS_BIAS, cap)
        target += tl.sum(tl.where(v == label, x, 0.0))
        m_new = tl.maximum(m, tl.max(x))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new))
        m = m_new
    lse = m + tl.log(s)
    tl.store(Lse + row, lse)
    tl.store(Loss + row, tl.where(label != ignore_index, lse - target, 0.0))


@triton.jit
def _grad_logits_kernel(
    Z,
    Bias,
    Labels,
    Lse,
    GradLoss,
    V,
    s_zn,
    ignore_index,
    cap,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Z += row * s_zn
    label = tl.load(Labels + row)
    lse = tl.load(Lse + row)
    scale = tl.where(label != ignore_index, tl.load(GradLoss + row), 0.0)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        v_ok = v < V
        x, dcap = _capped_logits(Z, Bias, v, v_ok, SOFTCAP, HAS_BIAS, cap)
        dz = (tl.exp(x - lse) - tl.where(v == label, 1.0, 0.0)) * scale * dcap
        tl.store(Z + v, dz.to(Z.dtype.element_ty), mask=v_ok)


def _rows(n: int, v: int, itemsize: int, chunk_rows: int | None) -> int:
    return max(1, min(n, chunk_rows or _CHUNK_BYTES // (v * itemsize)))


def _common_args(weight, bias, softcap):
    V = weight.shape[0]
    return dict(
        V=V,
        cap=float(softcap or 1.0),
        SOFTCAP=softcap is not None,
        HAS_BIAS=bias is not None,
        BV=_block_v(V),
        num_warps=8,
    )


def _supports(hidden) -> bool | str:
    return True if hidden.dtype in KERNEL_DTYPES else f"{hidden.dtype} inputs"


def supports_linear_cross_entropy_forward(hidden, **_) -> bool | str:
    return _supports(hidden)


def supports_linear_cross_entropy_backward(hidden, **_) -> bool | str:
    return _supports(hidden)


def linear_cross_entropy_forward(hidden, weight, bias, labels, ignore_index, softcap, chunk_rows=None):
    """loss (N,) float32 (0 at ignored tokens) and lse (N,) float32.

    hidden: (N, H), weight: (V, H), bias: (V,) or None, one dtype; labels: (N,) int64.
    ``chunk_rows`` overrides the tokens per chunk (default: a 512 MiB logits block).
    """
    n = hidden.shape[0]
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
    rows = _rows(n, weight.shape[0], hidden.element_size(), chunk_rows)
    bias_arg = bias.contiguous() if bias is not None else weight
    labels = labels.contiguous()
    for s in range(0, n, rows):
        z = hidden[s : s + rows] @ weight.T
        _forward_kernel[(z.shape[0],)](
            z,
            bias_arg,
            labels[s : s + rows],
            loss[s:],
            lse[s:],
            s_zn=z.stride(0),
            ignore_index=ignore_index,
            **_common_args(weight, bias, softcap),
        )
    return loss, lse


def linear_cross_entropy_backward(
    hidden,
    weight,
    bias,
    labels,
    lse,
    grad_loss,
    ignore_index,
    softcap,
    need_grad_weight,
    need_grad_bias,
    chunk_rows=None,
):
    """grad_hidden (N, H) in hidden.dtype; grad_weight (V, H) and grad_bias (V,) in weight.dtype, or None.

    Gradients of sum_n grad_loss_n * loss_n for any signed float32 ``grad_loss`` (N,).
    """
    n = hidden.shape[0]
    grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_grad_bias else None
    rows = _rows(n, weight.shape[0], hidden.element_size(), chunk_rows)
    bias_arg = bias.contiguous() if bias is not None else weight
    labels, lse, grad_loss = labels.contiguous(), lse.contiguous(), grad_loss.to(torch.float32).contiguous()
    for s in range(0, n, rows):
        x = hidden[s : s + rows]
        dz = x @ weight.T
        _grad_logits_kernel[(dz.shape[0],)](
            dz,
            bias_arg,
            labels[s : s + rows],
            lse[s:],
            grad_loss[s:],
            s_zn=dz.stride(0),
            ignore_index=ignore_index,
            **_common_args(weight, bias, softcap),
        )
        torch.mm(dz, weight, out=grad_hidden[s : s + rows])
        if grad_weight is not None:
            grad_weight.addmm_(dz.T, x)
        if grad_bias is not None:
            grad_bias += dz.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if grad_bias is not None else None
