"""Fused ops: each has a plain-torch reference and optional Triton / CUDA / C++ kernels.

Select the implementation with ``set_backend("torch"|"triton"|"cuda"|"cpu"|"auto")`` or
the environment variable ``FASTINFLUENCE_BACKEND``.
"""
from ._backend import BackendUnavailableError, available_backends, get_backend, set_backend
from .ghost import ghost_dot, ghost_norm
from .jl_project import jl_project
from .linear_cross_entropy import linear_cross_entropy
from .project import project, project_tokens
from .score_topk import TopK, merge_topk, score_topk

__all__ = [
    "BackendUnavailableError",
    "TopK",
    "available_backends",
    "get_backend",
    "ghost_dot",
    "ghost_norm",
    "jl_project",
    "linear_cross_entropy",
    "merge_topk",
    "project",
    "project_tokens",
    "score_topk",
    "set_backend",
]
