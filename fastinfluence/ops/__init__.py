"""Fused ops: each has a plain-torch reference and optional Triton / CUDA / C++ kernels.

Select the implementation with ``set_backend("torch"|"triton"|"cuda"|"cpu"|"auto")``,
``with use_backend(name):`` or the environment variable ``FASTINFLUENCE_BACKEND``; add a
backend with ``register_backend(name, module_or_object)`` (see ``_backend.py``).
"""

from ._backend import (
    BackendUnavailableError,
    Dispatch,
    available_backends,
    backend_names,
    get_backend,
    register_backend,
    registered_ops,
    set_backend,
    trace,
    unregister_backend,
    use_backend,
)
from .ghost import ghost_dot, ghost_norm
from .jl_project import jl_project
from .linear_cross_entropy import linear_cross_entropy
from .project import project, project_tokens
from .score_topk import TopK, merge_topk, score_topk

__all__ = [
    "BackendUnavailableError",
    "Dispatch",
    "TopK",
    "available_backends",
    "backend_names",
    "get_backend",
    "ghost_dot",
    "ghost_norm",
    "jl_project",
    "linear_cross_entropy",
    "merge_topk",
    "project",
    "project_tokens",
    "register_backend",
    "registered_ops",
    "score_topk",
    "set_backend",
    "trace",
    "unregister_backend",
    "use_backend",
]
