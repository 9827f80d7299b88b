"""``project`` for every layer of one backward pass in a single launch.

Small layers (attention projections, LoRA adapters) give launches too short to fill the
GPU; batching them removes one launch per layer and lets all layers' programs share a
wave. Each layer brings its own A (B, T, d_in_l), G (B, T, d_out_l), P_in (d_in_l[+1],
k_in_l) and P_out (d_out_l, k_out_l); B, T and the mask are shared. A table of per-layer
pointers, sizes and strides drives one program per (example, token range, layer), which
runs the same tile loop as ``project``.

The result is the feature row layout of the design: each layer's phi (k_out, k_in)
flattened row-major, layers concatenated in the order given.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fastinfluence.ops.project import project_reference

from ._common import KERNEL_DTYPES, autotune, block, dot_f32, mask_arg, token_splits
from .project import _GPU_CONFIGS, _INTERPRET_CONFIG, _TOKEN_QUANTUM, MAX_RANK, _project_rows

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Columns of the per-layer table (int64): pointers of A, G, P_in, P_out; d_in, d_out, k_in,
# k_out; 1 if P_in has the bias row; the layer's first output column; then the batch and
# token strides of A and G and the row strides of P_in and P_out. Rows are contiguous (the
# unit stride lets the loads vectorise), so each layer costs one table row, not 20 arguments.
_A, _G, _P_IN, _P_OUT, _D_IN, _D_OUT, _K_IN, _K_OUT, _BIAS, _OFFSET, _STRIDES = (tl.constexpr(i) for i in range(11))
_COLUMNS = tl.constexpr(16)


@autotune(_GPU_CONFIGS, _INTERPRET_CONFIG, key=["n_layers", "BKI", "BKO"])
@triton.jit
def _project_layers_kernel(
    Table, M, Out, T, n_layers, tokens_per_split, s_mb, s_mt, s_os, s_ob,
    A_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, A_VEC: tl.constexpr, G_VEC: tl.constexpr,
    HAS_MASK: tl.constexpr, BKI: tl.constexpr, BKO: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row = Table + tl.program_id(2).to(tl.int64) * _COLUMNS
    A = tl.load(row + _A).to(tl.pointer_type(A_DTYPE))
    G = tl.load(row + _G).to(tl.pointer_type(G_DTYPE))
    P_in = tl.load(row + _P_IN).to(tl.pointer_type(A_DTYPE))
    P_out = tl.load(row + _P_OUT).to(tl.pointer_type(G_DTYPE))
    # Sizes and strides read at run time carry no divisibility facts; *_VEC restores the ones
    # the host checked, so that loads stay 16 bytes wide.
    d_in = tl.multiple_of(tl.load(row + _D_IN), A_VEC)
    d_out = tl.multiple_of(tl.load(row + _D_OUT), G_VEC)
    k_in = tl.multiple_of(tl.load(row + _K_IN).to(tl.int32), A_VEC)
    k_out = tl.multiple_of(tl.load(row + _K_OUT).to(tl.int32), G_VEC)
    k_bias = tl.where(tl.load(row + _BIAS) != 0, k_in, 0)  # width of the bias row: k_in or none
    s_ab = tl.multiple_of(tl.load(row + _STRIDES), A_VEC)
    s_at = tl.multiple_of(tl.load(row + _STRIDES + 1), A_VEC)
    s_gb = tl.multiple_of(tl.load(row + _STRIDES + 2), G_VEC)
    s_gt = tl.multiple_of(tl.load(row + _STRIDES + 3), G_VEC)
    s_pid = tl.multiple_of(tl.load(row + _STRIDES + 4), A_VEC)
    s_pod = tl.multiple_of(tl.load(row + _STRIDES + 5), G_VEC)
    A, G = tl.multiple_of(A, 16), tl.multiple_of(G, 16)
    P_in, P_out = tl.multiple_of(P_in, 16), tl.multiple_of(P_out, 16)

    ki = tl.arange(0, BKI)
    # The bias row P_in[d_in] (zero for layers without one): masked tokens add nothing
    # either way, since their G rows read as zero.
    bias = tl.load(P_in + d_in * s_pid + ki, mask=ki < k_bias, other=0.0).to(tl.float32)
    t_start = split * tokens_per_split
    t_end = tl.minimum(T, t_start + tokens_per_split)
    phi = tl.zeros((BKO, BKI), tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        ok = t < t_end
        if HAS_MASK:
            ok = ok & (tl.load(M + b * s_mb + t * s_mt, mask=ok, other=0) != 0)
        t = t.to(tl.int64)
        a_t = _project_rows(A + b * s_ab, t * s_at, ok, d_in, 1, P_in, s_pid, 1, k_in, False, BT, BD, BKI)
        g_t = _project_rows(G + b * s_gb, t * s_gt, ok, d_out, 1, P_out, s_pod, 1, k_out, False, BT, BD, BKO)
        phi = dot_f32(tl.trans(g_t), a_t + bias[None, :], phi)
    o = tl.arange(0, BKO)
    out = Out + split * s_os + b * s_ob + tl.load(row + _OFFSET) + o[:, None] * k_in + ki[None, :]
    tl.store(out, phi, mask=(o[:, None] < k_out) & (ki[None, :] < k_in))


def _vector_width(tensors: list[torch.Tensor], sizes: list[int]) -> int:
    """16 // itemsize elements when every tensor is 16-byte aligned with strides (but the unit
    one) and every size in ``sizes`` a multiple of it; else 1."""
    vec = 16 // tensors[0].element_size()
    aligned = all(t.data_ptr() % 16 == 0 and all(st % vec == 0 for st in t.stride()[:-1]) for t in tensors)
    return vec if aligned and all(n % vec == 0 for n in sizes) else 1


def project_layers_reference(As, Gs, P_ins, P_outs, mask=None):
    return torch.cat([project_reference(A, G, Pi, Po, mask).flatten(1) for A, G, Pi, Po in zip(As, Gs, P_ins, P_outs)], 1)


def _check(As, Gs, P_ins, P_outs):
    if not (len(As) == len(Gs) == len(P_ins) == len(P_outs)) or not As:
        raise ValueError(
            f"project_layers: give one A, G, P_in and P_out per layer (got {len(As)}, {len(Gs)}, "
            f"{len(P_ins)}, {len(P_outs)})"
        )
    for l, (A, G) in enumerate(zip(As, Gs)):
        if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != As[0].shape[:2] or G.shape[:2] != As[0].shape[:2]:
            raise ValueError(
                f"project_layers: layer {l} has A {tuple(A.shape)} and G {tuple(G.shape)}; every layer needs "
                f"(B, T, d) with the (B, T) = {tuple(As[0].shape[:2])} of layer 0"
            )


def _runs_on_kernel(As, Gs, P_ins, P_outs) -> bool:
    a_dtypes, g_dtypes = {A.dtype for A in As}, {G.dtype for G in Gs}
    return (
        len(a_dtypes) == len(g_dtypes) == 1
        and {*a_dtypes, *g_dtypes} <= set(KERNEL_DTYPES)
        and all(P is not None and P.shape[1] <= MAX_RANK for P in (*P_ins, *P_outs))
    )


def project_layers(
    As: Sequence[torch.Tensor],
    Gs: Sequence[torch.Tensor],
    P_ins: Sequence[torch.Tensor | None],
    P_outs: Sequence[torch.Tensor | None],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected per-example gradients of several layers in one launch.

    Args:
        As[l]: (B, T, d_in_l), Gs[l]: (B, T, d_out_l); one dtype for all A, one for all G.
        P_ins[l]: (d_in_l[+1], k_in_l), P_outs[l]: (d_out_l, k_out_l), as for ``project``.
        mask: (B, T) bool or None, shared by the layers.

    Returns:
        (B, sum_l k_out_l * k_in_l) float32: phi_l (k_out_l, k_in_l) flattened row-major per
        layer, concatenated. Identity projections, ranks above 128 or float64 inputs run on
        the reference.
    """
    _check(As, Gs, P_ins, P_outs)
    if not _runs_on_kernel(As, Gs, P_ins, P_outs):
        return project_layers_reference(As, Gs, P_ins, P_outs, mask)
    B, T = As[0].shape[:2]
    device = As[0].device
    # Unit-stride rows; the converted tensors stay alive (in these lists) until the launch is queued.
    As = [A if A.stride(-1) == 1 else A.contiguous() for A in As]
    Gs = [G if G.stride(-1) == 1 else G.contiguous() for G in Gs]
    P_ins = [P.to(As[0].dtype).contiguous() for P in P_ins]
    P_outs = [P.to(Gs[0].dtype).contiguous() for P in P_outs]
    rows, offset = [], 0
    for A, G, Pi, Po in zip(As, Gs, P_ins, P_outs):
        k_in, k_out = Pi.shape[1], Po.shape[1]
        rows.append([
            A.data_ptr(), G.data_ptr(), Pi.data_ptr(), Po.data_ptr(), A.shape[2], G.shape[2], k_in, k_out,
            int(Pi.shape[0] == A.shape[2] + 1), offset,
            A.stride(0), A.stride(1), G.stride(0), G.stride(1), Pi.stride(0), Po.stride(0),
        ])
        offset += k_in * k_out
    if B == 0 or T == 0:
        return torch.zeros(B, offset, device=device, dtype=torch.float32)
    a_vec = _vector_width([*As, *P_ins], [A.shape[2] for A in As] + [P.shape[1] for P in P_ins])
    g_vec = _vector_width([*Gs, *P_outs], [G.shape[2] for G in Gs] + [P.shape[1] for P in P_outs])
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    splits, tokens_per_split = token_splits(T, B * len(As), device, _TOKEN_QUANTUM)
    partial = torch.empty(splits, B, offset, device=device, dtype=torch.float32)
    m, (s_mb, s_mt) = mask_arg(mask, table)
    _project_layers_kernel[(B, splits, len(As))](
        table, m, partial, T, len(As), tokens_per_split, s_mb, s_mt, partial.stride(0), partial.stride(1),
        A_DTYPE=_TL[As[0].dtype], G_DTYPE=_TL[Gs[0].dtype], A_VEC=a_vec, G_VEC=g_vec, HAS_MASK=mask is not None,
        BKI=block(max(P.shape[1] for P in P_ins)), BKO=block(max(P.shape[1] for P in P_outs)),
    )
    return partial[0] if splits == 1 else partial.sum(0)
