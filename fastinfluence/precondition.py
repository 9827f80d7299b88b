"""Preconditioners in projected space, fitted on the train features.

Scoring stays a plain dot product: a preconditioner transforms the query side only,
q -> H^-1 q, layer by layer (phi_l of shape (k_out, k_in), flattened row-major):

=========  ====================================================================  =========================
kind       statistic (fitted once, float64)                                       applied to a query layer
=========  ====================================================================  =========================
identity   none                                                                   phi
diagonal   m = mean_i phi_i^2                       (D_l,)                         phi / (m + l)
kfac       C_A = sum a~a~^T / T, C_G = sum g~g~^T / T  (from extraction)           (C_G + l_G)^-1 phi (C_A + l_A)^-1
ekfac      eigvecs Q_A, Q_G of C_A, C_G; s = mean_i (Q_G^T phi_i Q_A)^2          Q_G [(Q_G^T phi Q_A) / (s + l)] Q_A^T
full       F = mean_i phi_i phi_i^T                 (D_l, D_l), D_l <= 4096       (F + l)^-1 phi
=========  ====================================================================  =========================

Damping l defaults to ``damping_ratio`` (0.1) x the mean eigenvalue of the matrix it damps
(for kfac, of each factor); an absolute ``damping`` overrides it. The statistics are saved
beside a store (``precondition/<kind>.safetensors``) and reused while the store is unchanged;
damping is applied at use, so changing it needs no refit.

Optimizer-aware normalisation (TrackStar: g / sqrt(V) with Adam's or Adafactor's second
moment V, on query and train alike) acts before the projection, not on projected features:
it is ``GradientExtractor(normalizer=...)`` (``normalizer.py``), and every kind here applies
on top of normalised features as on plain ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import errors
from .features import FeatureSource, LayerSlice
from .options import PRECONDITIONERS as KINDS
from .store import FeatureStore, save_tensors, write_cache

FULL_MAX_DIM = 4096
log = logging.getLogger(__name__)


@dataclass
class Preconditioner:
    """Fitted statistics of one kind (see module table); ``apply`` preconditions queries.

    Attributes:
        kind: one of KINDS.
        layout: layer name -> LayerSlice of the features it was fitted on.
        stats: "<layer>.<name>" -> float64 tensor (names per kind: m; C_A, C_G; Q_A, Q_G, s; F).
        damping: absolute damping, or None for ``damping_ratio`` x mean eigenvalue.
    """

    kind: str
    layout: dict[str, LayerSlice]
    stats: dict[str, torch.Tensor]
    damping: float | None = None
    damping_ratio: float = 0.1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown preconditioner kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.damping is not None and not (self.damping > 0 and math.isfinite(self.damping)):
            raise ValueError(
                f"damping must be a positive finite number, got {self.damping!r}; leave it unset for "
                f"{self.damping_ratio} x the mean eigenvalue"
            )
        if not (self.damping_ratio > 0 and math.isfinite(self.damping_ratio)):
            raise ValueError(f"damping_ratio must be a positive finite number, got {self.damping_ratio!r}")

    def _damp(self, eigenvalues: torch.Tensor) -> float:
        if self.damping is not None:
            return self.damping
        damping = self.damping_ratio * float(eigenvalues.mean())
        # A layer whose statistics are all zero (e.g. LoRA A while B is still zero) scores
        # 0 whatever the damping; any positive value keeps its solve finite.
        return damping if damping > 0 and math.isfinite(damping) else 1.0

    def apply(self, phi: torch.Tensor) -> torch.Tensor:
        """phi: (Q, D) any float dtype -> (Q, D) float64, H^-1 phi layer by layer."""
        out = phi.to(torch.float64).clone()
        if self.kind == "identity":
            return out
        for name, sl in self.layout.items():
            x = out[:, sl.start : sl.stop]
            s = {k.rsplit(".", 1)[1]: v for k, v in self.stats.items() if k.rsplit(".", 1)[0] == name}
            if self.kind == "diagonal":
                x.div_(s["m"] + self._damp(s["m"]))
            elif self.kind == "full":
                F = s["F"] + self._damp(torch.diagonal(s["F"])) * torch.eye(len(s["F"]), dtype=torch.float64)
                x.copy_(torch.linalg.solve(F, x.T).T)
            else:
                P = x.reshape(-1, *sl.shape)
                if self.kind == "kfac":
                    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
                    G = s["C_G"] + self._damp(torch.diagonal(s["C_G"])) * eye(sl.shape[0])
                    A = s["C_A"] + self._damp(torch.diagonal(s["C_A"])) * eye(sl.shape[1])
                    P = torch.linalg.solve(G, P)
                    P = torch.linalg.solve(A, P.transpose(1, 2)).transpose(1, 2)
                else:
                    QG, QA = s["Q_G"], s["Q_A"]
                    P = QG @ ((QG.T @ P @ QA) / (s["s"] + self._damp(s["s"]))) @ QA.T
                x.copy_(P.reshape(len(x), -1))
        return out

    def save(self, path: str | Path, fitted_on: str) -> None:
        """Write the statistics atomically; ``fitted_on`` identifies the features they came from."""
        save_tensors(Path(path), self.stats, self._metadata(fitted_on))

    def _metadata(self, fitted_on: str) -> dict[str, str]:
        return {"kind": self.kind, "fitted_on": fitted_on}


def _stats_of(train: FeatureSource) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    stats = train.stats
    if stats is None:
        raise errors.FastInfluenceError(
            f"kfac/ekfac need covariance sums: extract the train features with {errors.name('covariances', True)}",
            "precondition",
        )
    return stats


def _second_moments(train, layout, chunk_rows: int, fn) -> dict[str, torch.Tensor]:
    """mean_i fn(layer, phi_i) over all train rows, per layer (one streaming pass)."""
    total: dict[str, torch.Tensor] = {}
    for c in train.iter_chunks(chunk_rows):
        x = c.data.to(torch.float64)
        for name, sl in layout.items():
            v = fn(name, x[:, sl.start : sl.stop])
            total[name] = total[name] + v if name in total else v
    n = max(len(train), 1)
    return {k: v / n for k, v in total.items()}


def fit(
    train: FeatureSource, kind: str, chunk_rows: int = 8192, damping: float | None = None, damping_ratio: float = 0.1
) -> Preconditioner:
    """Fit a preconditioner of ``kind`` on train features (in memory or a store)."""
    if kind not in KINDS:
        raise ValueError(f"unknown preconditioner {kind!r}; choose one of {', '.join(KINDS)}")
    layout = dict(train.layout)
    stats: dict[str, torch.Tensor] = {}
    if kind == "diagonal":
        for name, m in _second_moments(train, layout, chunk_rows, lambda n, x: (x * x).sum(0)).items():
            stats[f"{name}.m"] = m
    elif kind == "full":
        too_big = {n: sl.stop - sl.start for n, sl in layout.items() if sl.stop - sl.start > FULL_MAX_DIM}
        if too_big:
            raise ValueError(
                f"precondition='full' needs layers of at most {FULL_MAX_DIM} features, got {too_big}; use 'kfac' or "
                f"'ekfac'"
            )
        for name, F in _second_moments(train, layout, chunk_rows, lambda n, x: x.T @ x).items():
            stats[f"{name}.F"] = F
    elif kind in ("kfac", "ekfac"):
        # C_A per token and C_G per example, so that C_G (x) C_A has the scale of the
        # per-example Fisher E_i[phi phi^T] that diagonal, ekfac and full use (sum_t g a^T
        # adds T tokens' gradients): absolute damping and score magnitudes then mean the
        # same for every kind.
        examples = max(len(train), 1)
        for name, (A, G, count) in _stats_of(train).items():
            stats[f"{name}.C_A"], stats[f"{name}.C_G"] = A.double() / max(count, 1), G.double() / examples
        if kind == "ekfac":
            bases = {}
            for name in layout:
                QA = torch.linalg.eigh(stats.pop(f"{name}.C_A")).eigenvectors
                QG = torch.linalg.eigh(stats.pop(f"{name}.C_G")).eigenvectors
                bases[name] = (QG, QA)
                stats[f"{name}.Q_A"], stats[f"{name}.Q_G"] = QA, QG

            def rotated_sq(name, x):
                QG, QA = bases[name]
                return ((QG.T @ x.reshape(-1, *layout[name].shape) @ QA) ** 2).sum(0)

            for name, s in _second_moments(train, layout, chunk_rows, rotated_sq).items():
                stats[f"{name}.s"] = s
    # contiguous (eigh returns column-major bases) so a reloaded copy computes the same bits
    return Preconditioner(kind, layout, {k: v.contiguous() for k, v in stats.items()}, damping, damping_ratio)


def _fingerprint(store: FeatureStore) -> str:
    return hashlib.sha256(json.dumps([s["sha256"]["features"] for s in store.shards]).encode()).hexdigest()


def load_or_fit(
    train: FeatureSource, kind: str, damping: float | None = None, damping_ratio: float = 0.1, chunk_rows: int = 8192
) -> Preconditioner:
    """The preconditioner of ``kind`` for ``train``: loaded from beside a store when fitted on
    its current shards, else fitted (and saved beside the store when it is writable)."""
    if not isinstance(train, FeatureStore) or kind == "identity":
        return fit(train, kind, chunk_rows, damping, damping_ratio)
    fitted_on = _fingerprint(train)
    cached = train.read_cache("precondition", kind, {"fitted_on": fitted_on})
    if cached is not None:
        return Preconditioner(kind, dict(train.layout), cached, damping, damping_ratio)
    pre = fit(train, kind, chunk_rows, damping, damping_ratio)
    try:
        write_cache(train, "precondition", kind, pre.stats, pre._metadata(fitted_on))
    except OSError as exc:
        log.warning(
            "could not save the %s preconditioner beside %s (%s); it is kept in memory only", kind, train.path, exc
        )
    return pre
