"""Tensors to the raw pointers, dtype codes and sizes that both compiled backends (``cpu``, ``cuda``) take."""

from __future__ import annotations

import torch

from ..score_topk import TopK

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride (rows may be strided)."""
    return x if x.stride(1) == 1 else x.contiguous()


def jl_output(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with unit column stride, empty (B, k) float32 output)."""
    return rows_contiguous(x), torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)


def select_topk(S: torch.Tensor, k: int, index_offset: int, prev: TopK | None, launch) -> TopK:
    """Top-k of ``prev`` and the rows of S by a compiled ``topk_merge``; ``launch(**args)``
    adds the thread count or stream. The temporaries live until it returns."""
    Q, n = S.shape
    if prev is None:
        pv = torch.empty(Q, 0, dtype=S.dtype, device=S.device)
        pi = torch.empty(Q, 0, dtype=torch.int64, device=S.device)
    else:
        if prev.values.shape != prev.indices.shape or prev.values.shape[0] != Q:
            raise ValueError(
                f"score_topk: prev values {tuple(prev.values.shape)} and indices {tuple(prev.indices.shape)} "
                f"must both be (Q={Q}, k')"
            )
        pv = prev.values.to(S.dtype).contiguous()
        pi = prev.indices.to(torch.int64).contiguous()
    kp = pv.shape[1]
    k_out = min(k, kp + n)
    out = TopK(
        torch.empty(Q, k_out, dtype=S.dtype, device=S.device), torch.empty(Q, k_out, dtype=torch.int64, device=S.device)
    )
    if out.values.numel():
        launch(
            S=S.data_ptr(),
            dtype=DTYPE_CODES[S.dtype],
            Q=Q,
            n=n,
            lds=S.stride(0),
            index_offset=index_offset,
            prev_values=pv.data_ptr(),
            prev_indices=pi.data_ptr(),
            kp=kp,
            k_out=k_out,
            values=out.values.data_ptr(),
            indices=out.indices.data_ptr(),
        )
    return out
