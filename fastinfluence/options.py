"""Options objects shared by the API and the command line, and the names each option accepts.

``ScoreOptions`` is what ``fastinfluence.score`` takes; ``UnlearnOptions`` is the unlearning
method and its loss, taken by ``UnlearnTrainer`` and by the open-unlearning trainers
(``fastinfluence.integrations.open_unlearning``). Each field's default is defined here once:
the functions, the trainers and the command line's flags all read it from these classes.
Both check their values on construction and raise an ``OptionsError`` naming the field.

    fi.score(query, train, ScoreOptions(metric="cosine", topk=5))
    fi.score(query, train, metric="cosine", topk=5)                   # the same

This module imports no torch (the command line builds its parser from it) and nothing of
the package but ``errors``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import OptionsError, name

# Projection (ProjectionConfig)
PROJECTION_KINDS = ("gaussian", "rademacher")
MODES = ("factorized", "flat")
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "float64")
AUTOCAST_DTYPES = ("bfloat16", "float16")
# Scoring
METRICS = ("dot", "cosine")
PRECONDITIONERS = ("identity", "diagonal", "kfac", "ekfac", "full")
SCORE_AGGREGATES = ("mean", "max", "sum", "sumsq")
EXACT_METHODS = ("auto", "ghost", "dense")
KFAC_METHODS = ("kfac", "ekfac")
KFAC_PRODUCTS = ("auto", "dense", "ghost")
# Unlearning
RAPIDUN_AGGREGATES = ("mean", "topk_median")
METHODS = ("ga", "graddiff", "npo", "simnpo", "rapidun")
USES_RETAIN = ("graddiff", "npo", "simnpo", "rapidun")
REDUCTIONS = ("token", "example")
WEIGHT_NORMS = ("mean", "sum")
RETAIN_LOSS_TYPES = ("NLL", "KL")
RAPIDUN_TOKENS = ("all", "differing")


def check_damping(damping) -> None:
    """An absolute damping is None (the default: 0.1 x the mean eigenvalue) or a positive finite number."""
    if damping is not None and (
        isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < math.inf
    ):
        raise OptionsError(
            f"{name('damping')} must be a positive finite number, got {damping!r}: zero or negative damping flips "
            "or blows up the preconditioned scores; leave it unset for 0.1 x the mean eigenvalue",
            "damping",
        )


def _one_of(field: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(f"{name(field)} must be one of {', '.join(choices)}, got {value!r}", field)


class _Options:
    """What both options classes share: built from an object or keywords, never from both."""

    @classmethod
    def resolve(cls, options, kwargs: dict[str, Any], where: str):
        """``options`` (an instance, or None) or ``cls(**kwargs)``; giving both is an error."""
        if options is None:
            unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise OptionsError(
                    f"{where}() got unknown keyword argument(s) {', '.join(unknown)}; the options are "
                    f"{', '.join(f.name for f in dataclasses.fields(cls))}"
                )
            return cls(**kwargs)
        if not isinstance(options, cls):
            raise OptionsError(f"{where}() takes a {cls.__name__} as options, got {type(options).__name__}")
        if kwargs:
            raise OptionsError(
                f"{where}() got a {cls.__name__} and keyword argument(s) {', '.join(sorted(kwargs))}: give the "
                f"options one way, e.g. dataclasses.replace(options, {next(iter(sorted(kwargs)))}=...)"
            )
        return options


@dataclass
class ScoreOptions(_Options):
    """How ``fastinfluence.score`` scores queries against train rows.

    Attributes:
        metric: ``dot`` or ``cosine`` of the (preconditioned) features.
        precondition: None/``identity``, ``diagonal``, ``kfac``, ``ekfac``, ``full``, or a
            fitted ``Preconditioner``; kinds are fitted on the train rows (cached beside a store).
        topk: entries kept per query; None ranks every train row (Q x N values and indices:
            for small N; use ``matrix_path`` for the raw matrix of a large store).
        layer_normalize: scale each layer's features to unit norm before summing layers.
        aggregates: which of ``mean``, ``max``, ``sum``, ``sumsq`` over the queries to return per
            train row (a list, or one name; None: ``("mean", "max", "sumsq")``, none with ``index``).
        per_layer: also return each layer's share of the top-k scores.
        matrix_path: write the full (Q, N) float32 matrix there (``.npy``, memory-mapped), under a
            temporary name renamed when whole. Refused inside a feature store, over a model's
            files, over a directory, and over an existing file unless ``overwrite``.
        chunk_rows: train rows scored at a time; bounds the memory.
        damping: absolute damping of the preconditioner, > 0 (None: 0.1 x its mean eigenvalue).
        progress: show a progress bar over the train rows.
        device: where the chunks are scored (None: this rank's GPU when CUDA is available, else
            the CPU); results are returned on the CPU.
        matrix: also return the full (Q, N) float32 matrix in memory (``ScoreResult.matrix``, a
            numpy array); refused when it would exceed ``scoring.MATRIX_MAX_BYTES``.
        allow_incomplete: score the rows an interrupted store extraction left (refused otherwise).
        index: a ``FeatureIndex`` of the train rows (``fastinfluence.index.build_index``): the
            top-k comes from it instead of a streaming pass (no aggregates).
        overwrite: replace an existing file at ``matrix_path``.
    """

    metric: str = "dot"
    precondition: Any = None
    topk: int | None = 10
    layer_normalize: bool = False
    aggregates: Any = None
    per_layer: bool = False
    matrix_path: Any = None
    chunk_rows: int = 8192
    damping: float | None = None
    progress: bool = False
    device: Any = None
    matrix: bool = False
    allow_incomplete: bool = False
    index: Any = None
    overwrite: bool = False

    def __post_init__(self):
        _one_of("metric", self.metric, METRICS)
        if isinstance(self.precondition, str) and self.precondition not in PRECONDITIONERS:
            raise OptionsError(
                f"{name('precondition')} must be None, a Preconditioner or one of {', '.join(PRECONDITIONERS)}, got "
                f"{self.precondition!r}",
                "precondition",
            )
        if self.topk is not None and (isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1):
            raise OptionsError(
                f"{name('topk')} must be >= 1 (an integer, or None to rank every train row), got {self.topk!r}", "topk"
            )
        if isinstance(self.chunk_rows, bool) or not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise OptionsError(f"{name('chunk_rows')} must be >= 1 (an integer), got {self.chunk_rows!r}", "chunk_rows")
        check_damping(self.damping)
        if self.matrix and self.matrix_path is not None:
            raise OptionsError(
                f"give {name('matrix', True)} (in memory) or {name('matrix_path')} (on disk), not both", "matrix"
            )


@dataclass
class UnlearnOptions(_Options):
    """An unlearning method and its loss (see ``fastinfluence.losses`` for the formulas).

    Attributes:
        method: ``ga``, ``graddiff``, ``npo``, ``simnpo`` or ``rapidun``.
        alpha: retain-term coefficient; gamma: forget-term coefficient (every method).
        beta: NPO / SimNPO temperature (None: 0.1 for NPO, 2.5 for SimNPO).
        simnpo_gamma: SimNPO margin in the paper's units; delta: the same margin in
            open-unlearning's (gamma = beta * delta).
        reduction: ``example`` (mean of per-example means) or ``token`` (token mean over the
            batch, open-unlearning's and HF's).
        weight_norm: ``mean`` (divide by the batch) or ``sum`` (by the weights' sum, IMU's
            weighted average).
        retain_loss_type: ``NLL`` or ``KL`` (KL(reference || model) over every position of the
            retain batch, open-unlearning's).
        loss_reweight_tau: multiply the forget weights by ``weights.loss_reweight`` of the
            batch's current forget losses (LoReUn-style), or None.
        rapidun_tokens: ``all`` or ``differing``: which answer tokens RapidUn's forget loss counts.
        rapidun_without_clean: accept RapidUn forget examples without a clean answer (their
            forget term is then weighted gradient ascent on the poisoned answers).
        router_aux_loss: MoE models: leave the router auxiliary (load-balancing) loss out
            (False, the default), add the model's ``router_aux_loss_coef`` times it (True), or
            that many times it (a number > 0).
    """

    method: str = "graddiff"
    alpha: float = 1.0
    gamma: float = 1.0
    beta: float | None = None
    simnpo_gamma: float = 0.0
    delta: float = 0.0
    reduction: str = "example"
    weight_norm: str = "mean"
    retain_loss_type: str = "NLL"
    loss_reweight_tau: float | None = None
    rapidun_tokens: str = "all"
    rapidun_without_clean: bool = False
    router_aux_loss: bool | float = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise OptionsError(
                f"unknown unlearning method {self.method!r}; choose one of {', '.join(METHODS)}", "method"
            )
        _one_of("reduction", self.reduction, REDUCTIONS)
        _one_of("weight_norm", self.weight_norm, WEIGHT_NORMS)
        _one_of("retain_loss_type", self.retain_loss_type, RETAIN_LOSS_TYPES)
        _one_of("rapidun_tokens", self.rapidun_tokens, RAPIDUN_TOKENS)
        aux = self.router_aux_loss
        if not isinstance(aux, bool) and not (isinstance(aux, (int, float)) and aux > 0):
            raise OptionsError(
                f"{name('router_aux_loss')} must be True, False or a coefficient > 0, got {aux!r}", "router_aux_loss"
            )
        if self.beta is not None and not self.beta > 0:
            raise OptionsError(f"{name('beta')} must be > 0, got {self.beta!r}", "beta")
        if self.loss_reweight_tau is not None and not self.loss_reweight_tau > 0:
            raise OptionsError(
                f"{name('loss_reweight_tau')} must be > 0, got {self.loss_reweight_tau!r}", "loss_reweight_tau"
            )

    @property
    def uses_retain(self) -> bool:
        """Whether the method has a retain term."""
        return self.method in USES_RETAIN

    @property
    def temperature(self) -> float:
        """``beta``, or the method's default (0.1 for NPO, 2.5 for SimNPO)."""
        return self.beta if self.beta is not None else (0.1 if self.method == "npo" else 2.5)
