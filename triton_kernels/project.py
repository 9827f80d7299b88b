"""Fused factorised projection: phi_i = (G_i P_out)^T (A_i P_in), and the per-token factors.

``project``: one program per (example, token range). Each token tile of A and G is read
once; A~ = A P_in and G~ = G P_out live only in registers and phi += G~^T A~ accumulates
in float32. Token ranges of one example are summed afterwards (a deterministic sum of
``splits`` partials), so short batches still fill the GPU.

``project_tokens``: the same tile projection, written out per token with the mask and the
cast fused.

Identity projections (None), ranks above ``MAX_RANK`` and float64 inputs run on the torch
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, KERNEL_DTYPES, autotune, block, dot, dot_f32, mask_arg, token_splits

# Token ranges per program are multiples of this: 64 tokens keep B*T/64 programs in
# flight (a full wave for B=4, T=2048 on 132 SMs) while each tile still reuses P 64 times.
_TOKEN_QUANTUM = 16 if INTERPRET.value else 64

_GPU_CONFIGS = [
    triton.Config({"BT": bt, "BD": bd}, num_warps=w, num_stages=s)
    for bt, bd, w, s in [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (32, 128, 4, 4)]
]
_INTERPRET_CONFIG = triton.Config({"BT": 16, "BD": 16})

# k_in, k_out up to this keep A~, G~ and phi tiles in registers.
MAX_RANK = 128


@triton.jit
def _project_rows(
    x_ptr,
    row_off,
    row_ok,
    d,
    stride_xd,
    p_ptr,
    stride_pd,
    stride_pk,
    k,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BK: tl.constexpr,
):
    """(BT, BK) float32 = X[rows] @ P[:d] (+ P[d], the bias row). Rows with ``row_ok`` False read as 0.

    ``row_off`` (BT,) int64: element offsets of the rows from ``x_ptr``. P: (d[+1], k) in X's dtype.
    """
    offs_d = tl.arange(0, BD)
    offs_k = tl.arange(0, BK)
    k_ok = offs_k < k
    acc = tl.zeros((BT, BK), tl.float32)
    for d0 in range(0, d, BD):
        dd = d0 + offs_d
        d_ok = dd < d
        x = tl.load(x_ptr + row_off[:, None] + dd[None, :] * stride_xd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        p = tl.load(
            p_ptr + dd[:, None] * stride_pd + offs_k[None, :] * stride_pk, mask=d_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc = dot(x, p, acc)
    if HAS_BIAS:
        bias = tl.load(p_ptr + d * stride_pd + offs_k * stride_pk, mask=k_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    return acc


@autotune(_GPU_CONFIGS, _INTERPRET_CONFIG, key=["d_in", "d_out", "k_in", "k_out"])
@triton.jit
def _project_kernel(
    A,
    G,
    P_in,
    P_out,
    M,
    Phi,
    T,
    d_in,
    d_out,
    k_in,
    k_out,
    tokens_per_split,
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gd,
    s_pid,
    s_pik,
    s_pod,
    s_pok,
    s_mb,
    s_mt,
    s_fs,
    s_fb,
    s_fo,
    s_fi,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BKI: tl.constexpr,
    BKO: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    t_start = split * tokens_per_split
    t_end = tl.minimum(T, t_start + tokens_per_split)
    phi = tl.zeros((BKO, BKI), tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        ok = t < t_end
        if HAS_MASK:
            ok = ok & (tl.load(M + b * s_mb + t * s_mt, mask=ok, other=0) != 0)
        t = t.to(tl.int64)
        # Masked tokens read as zero rows of G, so they add nothing to phi (and NaN in them is never read).
        a_t = _project_rows(A + b * s_ab, t * s_at, ok, d_in, s_ad, P_in, s_pid, s_pik, k_in, HAS_BIAS, BT, BD, BKI)
        g_t = _project_rows(G + b * s_gb, t * s_gt, ok, d_out, s_gd, P_out, s_pod, s_pok, k_out, False, BT, BD, BKO)
        phi = dot_f32(tl.trans(g_t), a_t, phi)
    o = tl.arange(0, BKO)
    i = tl.arange(0, BKI)
    out = Phi + split * s_fs + b * s_fb + o[:, None] * s_fo + i[None, :] * s_fi
    tl.store(out, phi, mask=(o[:, None] < k_out) & (i[None, :] < k_in))


@autotune(_GPU_CONFIGS, _INTERPRET_CONFIG, key=["d", "k"])
@triton.jit
def _project_tokens_kernel(
    X,
    P,
    M,
    Out,
    T,
    n_rows,
    d,
    k,
    s_xb,
    s_xt,
    s_xd,
    s_pd,
    s_pk,
    s_mb,
    s_mt,
    s_ob,
    s_ot,
    s_ok,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    ok = row < n_rows
    b = row // T
    t = row % T
    if HAS_MASK:
        ok = ok & (tl.load(M + b * s_mb + t * s_mt, mask=ok, other=0) != 0)
    x_t = _project_rows(X, b * s_xb + t * s_xt, ok, d, s_xd, P, s_pd, s_pk, k, HAS_BIAS, BT, BD, BK)
    x_t = tl.where(ok[:, None], x_t, 0.0)  # masked rows would otherwise hold the bias row
    kk = tl.arange(0, BK)
    out = Out + b[:, None] * s_ob + t[:, None] * s_ot + kk[None, :] * s_ok
    tl.store(out, x_t.to(Out.dtype.element_ty), mask=(row < n_rows)[:, None] & (kk < k)[None, :])


def _runs_on_kernel(A, G, P_in, P_out) -> bool:
    return (
        P_in is not None
        and P_out is not None
        and max(P_in.shape[1], P_out.shape[1]) <= MAX_RANK
        and A.dtype in KERNEL_DTYPES
        and G.dtype in KERNEL_DTYPES
    )


def supports_project(A, G, P_in, P_out, **_) -> bool | str:
    if _runs_on_kernel(A, G, P_in, P_out):
        return True
    return f"identity projections, ranks above {MAX_RANK} or float64 inputs"


def supports_project_tokens(A, G, P_in, P_out, out_dtype=None, **_) -> bool | str:
    if out_dtype is not None and out_dtype not in KERNEL_DTYPES:
        return f"out_dtype {out_dtype}"
    return supports_project(A, G, P_in, P_out)


def project(
    A: torch.Tensor,
    G: torch.Tensor,
    P_in: torch.Tensor | None,
    P_out: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """phi (B, k_out, k_in) float32; see ``fastinfluence.ops.project``."""
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    P_in, P_out = P_in.to(A.dtype), P_out.to(G.dtype)
    if B == 0 or T == 0:
        return torch.zeros(B, k_out, k_in, device=A.device, dtype=torch.float32)
    splits, tokens_per_split = token_splits(T, B, A.device, _TOKEN_QUANTUM)
    partial = torch.empty(splits, B, k_out, k_in, device=A.device, dtype=torch.float32)
    m, (s_mb, s_mt) = mask_arg(mask, A)
    _project_kernel[(B, splits)](
        A,
        G,
        P_in,
        P_out,
        m,
        partial,
        T,
        d_in,
        d_out,
        k_in,
        k_out,
        tokens_per_split,
        *A.stride(),
        *G.stride(),
        *P_in.stride(),
        *P_out.stride(),
        s_mb,
        s_mt,
        *partial.stride(),
        HAS_MASK=mask is not None,
        HAS_BIAS=P_in.shape[0] == d_in + 1,
        BKI=block(k_in),
        BKO=block(k_out),
    )
    return partial[0] if splits == 1 else partial.sum(0)


def _project_side(X, P, mask, out_dtype, d):
    B, T, _ = X.shape
    k = P.shape[1]
    P = P.to(X.dtype)
    out = torch.empty(B, T, k, device=X.device, dtype=out_dtype)
    n_rows = B * T
    if n_rows == 0:
        return out
    m, (s_mb, s_mt) = mask_arg(mask, X)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BT"]),)  # noqa: E731
    _project_tokens_kernel[grid](
        X,
        P,
        m,
        out,
        T,
        n_rows,
        d,
        k,
        *X.stride(),
        *P.stride(),
        s_mb,
        s_mt,
        *out.stride(),
        HAS_MASK=mask is not None,
        HAS_BIAS=P.shape[0] == d + 1,
        BK=block(k),
    )
    return out


def project_tokens(
    A: torch.Tensor,
    G: torch.Tensor,
    P_in: torch.Tensor | None,
    P_out: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A~ (B, T, k_in), G~ (B, T, k_out) in ``out_dtype`` (float32 when None).

    See ``fastinfluence.ops.project_tokens``.
    """
    out_dtype = out_dtype or torch.float32
    return (
        _project_side(A, P_in, mask, out_dtype, A.shape[-1]),
        _project_side(G, P_out, mask, out_dtype, G.shape[-1]),
    )
