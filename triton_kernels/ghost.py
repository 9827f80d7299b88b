"""Exact per-example gradient inner products from factors, tile by tile.

    <grad W_i, grad W_j>_F = sum_{t,s} (a_it . a_js [+ 1]) (g_it . g_js)

One program per (i, j, range of i's tokens): for each pair of token tiles it forms the
(BT, BT) blocks of A_i A_j^T and G_i G_j^T in registers, multiplies them elementwise and
accumulates; no T x T matrix reaches memory. Token ranges are summed afterwards.
``ghost_norm`` is the diagonal j = i of the same kernel. float64 runs on the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, KERNEL_DTYPES, autotune, dot, mask_arg, token_splits

_TOKEN_QUANTUM = 16 if INTERPRET.value else 64  # the largest BT of the configs

_GPU_CONFIGS = [
    triton.Config({"BT": bt, "BD": bd}, num_warps=w, num_stages=s)
    for bt, bd, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 4)]
]
_INTERPRET_CONFIG = triton.Config({"BT": 16, "BD": 16})


@triton.jit
def _gram(X, x_off, x_ok, s_xd, Y, y_off, y_ok, s_yd, d, BT: tl.constexpr, BD: tl.constexpr):
    """(BT, BT) float32 block X[rows] Y[rows]^T over d features; rows not ok read as zero."""
    dd = tl.arange(0, BD)
    acc = tl.zeros((BT, BT), tl.float32)
    for d0 in range(0, d, BD):
        d_ok = (d0 + dd) < d
        x = tl.load(X + x_off[:, None] + (d0 + dd)[None, :] * s_xd, mask=x_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(Y + y_off[:, None] + (d0 + dd)[None, :] * s_yd, mask=y_ok[:, None] & d_ok[None, :], other=0.0)
        acc = dot(x, tl.trans(y), acc)
    return acc


@triton.jit
def _token_rows(M, s_mb, s_mt, b, t, T, HAS_MASK: tl.constexpr):
    ok = t < T
    if HAS_MASK:
        ok = ok & (tl.load(M + b * s_mb + t * s_mt, mask=ok, other=0) != 0)
    return ok


@autotune(_GPU_CONFIGS, _INTERPRET_CONFIG, key=["d_in", "d_out"])
@triton.jit
def _ghost_kernel(
    A1,
    G1,
    M1,
    A2,
    G2,
    M2,
    Out,
    T1,
    T2,
    d_in,
    d_out,
    tokens_per_split,
    s_a1b,
    s_a1t,
    s_a1d,
    s_g1b,
    s_g1t,
    s_g1d,
    s_m1b,
    s_m1t,
    s_a2b,
    s_a2t,
    s_a2d,
    s_g2b,
    s_g2t,
    s_g2d,
    s_m2b,
    s_m2t,
    s_os,
    s_oi,
    s_oj,
    HAS_M1: tl.constexpr,
    HAS_M2: tl.constexpr,
    BIAS: tl.constexpr,
    DIAG: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    if DIAG:
        j = i
    else:
        j = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    t_start = split * tokens_per_split
    t_end = tl.minimum(T1, t_start + tokens_per_split)
    acc = tl.zeros((BT, BT), tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        ok1 = _token_rows(M1, s_m1b, s_m1t, i, t, t_end, HAS_M1)
        t = t.to(tl.int64)
        for s0 in range(0, T2, BT):
            s = s0 + tl.arange(0, BT)
            ok2 = _token_rows(M2, s_m2b, s_m2t, j, s, T2, HAS_M2)
            s = s.to(tl.int64)
            ka = _gram(A1 + i * s_a1b, t * s_a1t, ok1, s_a1d, A2 + j * s_a2b, s * s_a2t, ok2, s_a2d, d_in, BT, BD)
            # Masked rows of G are zero, so the bias term of masked tokens drops out here.
            kg = _gram(G1 + i * s_g1b, t * s_g1t, ok1, s_g1d, G2 + j * s_g2b, s * s_g2t, ok2, s_g2d, d_out, BT, BD)
            if BIAS:
                ka += 1.0
            acc += ka * kg
    tl.store(Out + split * s_os + i * s_oi + j * s_oj, tl.sum(acc))


def _launch(A1, G1, mask1, A2, G2, mask2, bias, diag):
    B1, T1, d_in = A1.shape
    B2, T2 = A2.shape[:2]
    d_out = G1.shape[-1]
    pairs = B1 * (1 if diag else B2)
    splits, tokens_per_split = token_splits(T1, pairs, A1.device, _TOKEN_QUANTUM)
    if pairs == 0 or T1 == 0 or T2 == 0:
        return torch.zeros(B1, 1 if diag else B2, device=A1.device, dtype=torch.float32)
    out = torch.empty(splits, B1, 1 if diag else B2, device=A1.device, dtype=torch.float32)
    m1, (s_m1b, s_m1t) = mask_arg(mask1, A1)
    m2, (s_m2b, s_m2t) = mask_arg(mask2, A2)
    _ghost_kernel[(B1, 1 if diag else B2, splits)](
        A1,
        G1,
        m1,
        A2,
        G2,
        m2,
        out,
        T1,
        T2,
        d_in,
        d_out,
        tokens_per_split,
        *A1.stride(),
        *G1.stride(),
        s_m1b,
        s_m1t,
        *A2.stride(),
        *G2.stride(),
        s_m2b,
        s_m2t,
        out.stride(0),
        out.stride(1),
        0 if diag else out.stride(2),
        HAS_M1=mask1 is not None,
        HAS_M2=mask2 is not None,
        BIAS=bool(bias),
        DIAG=diag,
    )
    return out.sum(0)


def _runs_on_kernel(A1, G1, A2, G2) -> bool:
    return A1.dtype == A2.dtype and G1.dtype == G2.dtype and {A1.dtype, G1.dtype} <= set(KERNEL_DTYPES)


def _supports(A1, G1, A2, G2) -> bool | str:
    return True if _runs_on_kernel(A1, G1, A2, G2) else "float64 or mixed input dtypes"


def supports_ghost_dot(A1, G1, A2, G2, **_) -> bool | str:
    return _supports(A1, G1, A2, G2)


def supports_ghost_norm(A, G, **_) -> bool | str:
    return _supports(A, G, A, G)


def ghost_dot(A1, G1, A2, G2, mask1=None, mask2=None, bias=False):
    """(B1, B2) float32 <grad W_i, grad W_j>_F; see ``fastinfluence.ops.ghost_dot``."""
    return _launch(A1, G1, mask1, A2, G2, mask2, bias, diag=False)


def ghost_norm(A, G, mask=None, bias=False):
    """(B,) float32 ||grad W_i||_F^2; see ``fastinfluence.ops.ghost_norm``."""
    return _launch(A, G, mask, A, G, mask, bias, diag=True)[:, 0]
