"""Triton kernels, installed as ``fastinfluence.triton_kernels``.

Each op lives in a module of the same name as its ``fastinfluence.ops`` function and is
re-exported here under that name, with ``supports_<op>`` saying which inputs it covers
(the registry runs the others on torch); that is how the backend registry finds them. Importing
this package needs ``triton``; the registry reports a missing one when the backend is asked for.
"""

from __future__ import annotations

import os

import torch

from .ghost import ghost_dot, ghost_norm, supports_ghost_dot, supports_ghost_norm
from .linear_cross_entropy import (
    linear_cross_entropy_backward,
    linear_cross_entropy_forward,
    linear_cross_entropy_forward_grad,
    supports_linear_cross_entropy_backward,
    supports_linear_cross_entropy_forward,
    supports_linear_cross_entropy_forward_grad,
)
from .project import project, project_tokens, supports_project, supports_project_tokens
from .score_topk import score_topk, supports_score_topk

__all__ = [
    "ghost_dot",
    "ghost_norm",
    "is_available",
    "linear_cross_entropy_backward",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_forward_grad",
    "project",
    "project_tokens",
    "score_topk",
    "supports_ghost_dot",
    "supports_ghost_norm",
    "supports_linear_cross_entropy_backward",
    "supports_linear_cross_entropy_forward",
    "supports_linear_cross_entropy_forward_grad",
    "supports_project",
    "supports_project_tokens",
    "supports_score_topk",
]


def is_available(device: torch.device) -> tuple[bool, str]:
    """Triton runs on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1`` (slow; for tests)."""
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return (
        False,
        f"Triton kernels need a CUDA device (inputs are on {device}); set TRITON_INTERPRET=1 to interpret them on "
        f"the CPU",
    )
