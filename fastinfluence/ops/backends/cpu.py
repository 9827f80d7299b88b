"""The ``cpu`` backend: C++/OpenMP host twins of the CUDA kernels (``csrc/*.cpp``).

The extension ``_fi_cpu`` is compiled by ``pip install`` when a C++ compiler is there;
without it this backend reports itself unavailable and, under ``auto``, the ops run on
torch after a one-line warning. The helpers below turn tensors into the raw pointers and
sizes both compiled backends take (the CUDA wrapper reuses them).
"""
from __future__ import annotations

import warnings

import torch

from ..jl_project import jl_project_reference, jl_scale, KINDS
from ..score_topk import TopK, scores_and_aggregates

try:
    from . import _fi_cpu as _ext

    _why_not = ""
except ImportError as exc:
    _ext = None
    _why_not = f"the C++ host kernels are not built ({exc})"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_warned = False


def is_available(device: torch.device) -> tuple[bool, str]:
    global _warned
    if device.type != "cpu":
        return False, f"the host kernels run on CPU tensors (inputs are on {device})"
    if _ext is None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"fastinfluence: {_why_not}; jl_project and score_topk run on torch "
                "(reinstall with a C++17 compiler: pip install -e .)",
                RuntimeWarning,
                stacklevel=2,
            )
        return False, _why_not
    return True, ""


# ------------------------------------------------------------------------ marshalling


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride (rows may be strided)."""
    return x if x.stride(1) == 1 else x.contiguous()


def jl_output(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with unit column stride, empty (B, k) float32 output)."""
    return rows_contiguous(x), torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)


def select_topk(S: torch.Tensor, k: int, index_offset: int, prev: TopK | None, launch) -> TopK:
    """Top-k of ``prev`` and the rows of S by a compiled ``topk_merge``; ``launch(*args)``
    adds the trailing thread count or stream. The temporaries live until it returns."""
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
    out = TopK(torch.empty(Q, k_out, dtype=S.dtype, device=S.device), torch.empty(Q, k_out, dtype=torch.int64, device=S.device))
    if out.values.numel():
        launch(S.data_ptr(), DTYPE_CODES[S.dtype], Q, n, S.stride(0), index_offset, pv.data_ptr(), pi.data_ptr(),
               kp, k_out, out.values.data_ptr(), out.indices.data_ptr())
    return out


# -------------------------------------------------------------------------------- ops


def jl_project(x: torch.Tensor, k: int, seed: int = 0, kind: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """Host twin of ``ops.jl_project`` (float64 inputs run on the torch reference)."""
    if x.dtype == torch.float64:
        return jl_project_reference(x, k, seed, kind, offset)
    x, out = jl_output(x, k)
    B, D = x.shape
    _ext.jl_project(x.data_ptr(), DTYPE_CODES[x.dtype], B, D, x.stride(0), out.data_ptr(), k, seed,
                    KINDS[kind], offset, jl_scale(k), torch.get_num_threads())
    return out


def score_topk(query, train, k, query_scale=None, train_scale=None, index_offset=0, prev=None):
    """``ops.score_topk`` with the top-k selected by the host twin (a bounded heap per row)."""
    S, aggregates = scores_and_aggregates(query, train, query_scale, train_scale)
    top = select_topk(S, k, index_offset, prev, lambda *args: _ext.topk_merge(*args, torch.get_num_threads()))
    return top, aggregates
