"""The ``cpu`` backend: C++/OpenMP host twins of the CUDA kernels (``csrc/*.cpp``).

The extension ``_fi_cpu`` is compiled by ``pip install`` when a C++ compiler is there;
without it this backend reports itself unavailable and, under ``auto``, the ops run on
torch after a one-line warning.
"""

from __future__ import annotations

import warnings

import torch

from .._common import masked
from ..jl_project import KINDS, jl_scale
from ..project import project_side
from ..score_topk import scores_and_aggregates
from ._marshal import DTYPE_CODES, jl_output, select_topk

try:
    from . import _fi_cpu as _ext

    _why_not = ""
except ImportError as exc:
    _ext = None
    _why_not = f"the C++ host kernels are not built ({exc})"

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


# -------------------------------------------------------------------------------- ops


def supports_jl_project(x: torch.Tensor, **_) -> bool | str:
    return True if x.dtype != torch.float64 else "float64 inputs (the host kernel accumulates in float32)"


def jl_project(x: torch.Tensor, k: int, seed: int = 0, kind: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """Host twin of ``ops.jl_project`` (float32/float16/bfloat16 inputs)."""
    x, out = jl_output(x, k)
    B, D = x.shape
    _ext.jl_project(
        x=x.data_ptr(),
        dtype=DTYPE_CODES[x.dtype],
        B=B,
        D=D,
        ldx=x.stride(0),
        out=out.data_ptr(),
        k=k,
        seed=seed,
        kind=KINDS[kind],
        offset=offset,
        scale=jl_scale(k),
        num_threads=torch.get_num_threads(),
    )
    return out


def supports_project(A: torch.Tensor, G: torch.Tensor, **_) -> bool | str:
    dtypes = {A.dtype, G.dtype}
    if torch.bfloat16 not in dtypes or not dtypes <= {torch.bfloat16, torch.float32}:
        return "needs bfloat16 A and G (one side may be float32); other dtypes run on torch in their own precision"
    return True


def project(A, G, P_in, P_out, mask=None):
    """``ops.project`` for bfloat16 inputs: a bfloat16 model, or ``ProjectionConfig(autocast=
    "bfloat16")``, where G is bfloat16 and A is bfloat16 or, for layers fed by a float32 norm,
    float32 (rounded to bfloat16 first, as the autocast Linear itself rounded it).

    The two side products A P_in and G P_out run as bfloat16 matmuls, with P (and its bias
    row) rounded to bfloat16 too (exact where its entries are, e.g. Rademacher at k = 16 or
    64); oneDNN accumulates in float32 and rounds each projected token once, a relative 2^-9;
    the sum over tokens is float32.
    ``project_tokens`` (extraction with ``tokens=True`` / ``covariances=True``) stays float32
    throughout, so those rows differ from these by that rounding (about 3e-3 relative).
    Up-casting the (B, T, d) inputs to float32 first, as the reference does, costs
    2-3x more on CPUs with AVX-512 BF16 for the same inputs; the one extra rounding is of the
    size the bfloat16 forward already put into A and G.
    """
    At = masked(project_side(A, P_in, torch.bfloat16), mask).float()
    Gt = masked(project_side(G, P_out, torch.bfloat16), mask).float()
    return Gt.transpose(1, 2) @ At


def score_topk(query, train, k, query_scale=None, train_scale=None, index_offset=0, prev=None):
    """``ops.score_topk`` with the top-k selected by the host twin (a bounded heap per row)."""
    S, aggregates = scores_and_aggregates(query, train, query_scale, train_scale)
    top = select_topk(
        S, k, index_offset, prev, lambda **args: _ext.topk_merge(**args, num_threads=torch.get_num_threads())
    )
    return top, aggregates
