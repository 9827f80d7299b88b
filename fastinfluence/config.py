"""Configuration dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from . import errors
from .options import AUTOCAST_DTYPES, MODES, STORAGE_DTYPES
from .options import PROJECTION_KINDS as KINDS

_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}


@dataclass
class ProjectionConfig:
    """How per-example gradients become features.

    Attributes:
        rank_in: k_in, width of the input-side projection P_in (d_in x k_in). A layer
            with d_in (+1 for bias) <= rank_in keeps that side exact (identity).
        rank_out: k_out, width of P_out (d_out x k_out); same rule.
        kind: ``gaussian`` (entries N(0, 1/k)) or ``rademacher`` (+-1/sqrt(k)).
        seed: projection seed; matrices are a function of (seed, layer name, shape) only.
        include: regexes; a layer is captured when its name matches any (None: all
            supported layers whose weight is trainable, or all when none is).
        exclude: regexes; matching layers are skipped (applied after ``include``).
        include_bias: also capture the bias gradient of layers that have a bias.
        dtype: storage dtype of the features (``float32``, ``float16``, ``bfloat16``, ``float64``).
        mode: ``factorized`` (per layer, phi = P_out^T grad W P_in, k_out x k_in) or
            ``flat`` (all selected gradients as one vector, JL-projected to ``dim`` by
            ``ops.jl_project``; for small parameter sets such as LoRA adapters).
        dim: output width of the flat mode.
        autocast: None (default: the model's own dtype) or ``bfloat16`` / ``float16``: run the
            extraction's forward pass under ``torch.autocast`` in that dtype (its backward follows),
            while projections and features stay float32. Faster where the hardware has fast
            low-precision matmuls (bfloat16 on CPUs with AVX-512 BF16 / AMX, any recent GPU), at
            some agreement with the float32 features: measure it (``bench/results/peers_ours_before_after_cpu.json``).
            Recorded in the features' metadata, so they are never mixed with float32 ones.
    """

    rank_in: int = 64
    rank_out: int = 64
    kind: Literal["gaussian", "rademacher"] = "gaussian"
    seed: int = 0
    include: list[str] | None = None
    exclude: list[str] | None = field(default_factory=list)
    include_bias: bool = True
    dtype: str = "float32"
    mode: Literal["factorized", "flat"] = "factorized"
    dim: int = 8192
    autocast: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise errors.FastInfluenceError(
                f"{errors.name('ProjectionConfig.mode')} must be 'factorized' or 'flat', got {self.mode!r}"
            )
        if self.kind not in KINDS:
            raise errors.FastInfluenceError(
                f"{errors.name('ProjectionConfig.kind')} must be 'gaussian' or 'rademacher', got {self.kind!r}"
            )
        for attr in ("rank_in", "rank_out", "dim"):
            v = getattr(self, attr)
            if not isinstance(v, int) or v < 1:
                raise errors.FastInfluenceError(
                    f"{errors.name('ProjectionConfig.' + attr)} must be a positive int, got {v!r}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise errors.FastInfluenceError(
                f"{errors.name('ProjectionConfig.seed')} must be an int in [0, 2^63), got {self.seed!r}"
            )
        if self.dtype not in _DTYPES:
            raise errors.FastInfluenceError(
                f"{errors.name('ProjectionConfig.dtype')} must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise errors.FastInfluenceError(
                f"{errors.name('ProjectionConfig.autocast')} must be None, 'bfloat16' or 'float16', got "
                f"{self.autocast!r}"
            )
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.exclude = list(self.exclude or [])

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.autocast is None else _DTYPES[self.autocast]

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["autocast"] is None:  # the default leaves the metadata of stores written before it unchanged
            del d["autocast"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProjectionConfig:
        return cls(**d)
