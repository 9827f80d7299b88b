"""Triton kernels, installed as ``fastinfluence.triton_kernels``.

Each op lives in a module of the same name as its ``fastinfluence.ops`` function and is
re-exported here under that name, which is how the backend registry finds it.
"""
from __future__ import annotations

import os

import torch


def is_available(device: torch.device) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"Triton kernels need a CUDA device (inputs are on {device}); set TRITON_INTERPRET=1 to interpret them on the CPU"
