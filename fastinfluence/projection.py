"""Deterministic projection matrices: a function of (seed, layer name, shape, kind) only.

Generated on the CPU with torch's CPU generator (the same bits on every machine and for
every backend), then moved to the device where they are used, and cached.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .capture import Layer
from .config import ProjectionConfig


def _generator(seed: int, name: str, rows: int, cols: int, kind: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{name}|{rows}x{cols}|{kind}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_matrix(seed: int, name: str, rows: int, cols: int, kind: str) -> torch.Tensor:
    """(rows, cols) float32 on the CPU with E[P P^T] = I: entries N(0, 1/cols) or +-1/sqrt(cols)."""
    gen = _generator(seed, name, rows, cols, kind)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
    if kind == "rademacher":
        return (torch.randint(0, 2, (rows, cols), generator=gen).float() * 2 - 1) / math.sqrt(cols)
    raise ValueError(f"unknown projection kind {kind!r}; use 'gaussian' or 'rademacher'")


def layer_projections(layer: Layer, config: ProjectionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_in, P_out) for a layer, float32 on the CPU.

    P_in: (d_in + bias, k_in), P_out: (d_out, k_out). A side whose width is at most its
    rank is kept exact: the identity (k = width), so small layers such as LoRA factors
    are never blown up by a random projection. With a bias, P_in's last row is the bias row.
    """
    rows_in = layer.d_in + int(layer.bias)
    if rows_in <= config.rank_in:
        P_in = torch.eye(rows_in)
    else:
        P_in = random_matrix(config.seed, layer.name + ".in", rows_in, config.rank_in, config.kind)
    if layer.d_out <= config.rank_out:
        P_out = torch.eye(layer.d_out)
    else:
        P_out = random_matrix(config.seed, layer.name + ".out", layer.d_out, config.rank_out, config.kind)
    return P_in, P_out
