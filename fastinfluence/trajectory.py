"""Trajectory scores over the stores an ``InfluenceCallback`` wrote during training.

TracIn-CP (Pruthi et al. 2020) sums learning-rate weighted gradient inner products over
the checkpoints of a training run. With training-time features every train row is the
gradient of one example at the step where it was trained, so the sum runs over the
times each example was trained::

    tracin(q, i) = sum_k sum_{r in interval k, id(r) = i} lr_r <phi_q(checkpoint k), phi_r>

where interval k is the store ``step-<b_k>`` (the steps after the previous interval up to
b_k), phi_q(checkpoint k) is the query's feature extracted from ``checkpoint-<b_k>`` (the
weights at the end of that interval, the checkpoint the Trainer saved when the store was
written) and lr_r is the learning rate of the optimizer step row r took part in
(``meta["lr"]``). Scores are per example id (an example trained in several epochs sums
its rows); train ids are listed in the order they were first trained.

LESS (Xia et al. 2024) replaces each train gradient by its Adam update direction Gamma_r
(``InfluenceCallback(features=("adam",))``, see ``callback``) and the inner product by a cosine,
while the query side keeps plain gradients (the SGD direction)::

    less(q, i) = sum_k sum_{r in interval k, id(r) = i} lr_r cos(phi_q(checkpoint k), Gamma~_r)

with Gamma~_r = P_out^T Gamma_r P_in the projected direction (cosines in projected space, as
LESS computes them after its random projection). LESS evaluates its train directions at each
checkpoint with the state saved there; here each is taken at the step the example was
trained, with the state Adam used for that step, so the sum covers the whole trajectory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from .callback import interval_stores
from .features import Features
from .ops import merge_topk
from .scoring import AGGREGATES, ScoreResult, _aggregates, _check_pair, _query_features
from .store import FeatureStore


def _stores(train, kind: str) -> list[FeatureStore]:
    if isinstance(train, (str, os.PathLike)):
        paths = interval_stores(train, kind)
        if not paths:
            raise FileNotFoundError(
                f"no {kind} interval store (step-*) under {train}: train with InfluenceCallback(features=(..., "
                f"'{kind}')) first (it writes {kind} features only when they are named)"
            )
        stores = [FeatureStore.open(p) for p in paths]
    else:
        stores = [s if isinstance(s, FeatureStore) else FeatureStore.open(s) for s in train]
    for s in stores:
        _step(s)
        got = s.meta.get("features", "gradient")
        if got != kind:
            raise ValueError(
                f"store {s.path} holds {got} features; this score needs {kind} features: "
                f"InfluenceCallback(features=('{kind}',)) writes them"
            )
    return stores


def _step(store: FeatureStore) -> int:
    if "last_step" not in store.meta or "lr" not in store.meta:
        raise ValueError(
            f"store {store.path} has no training steps and learning rates: it was not written by InfluenceCallback"
        )
    return int(store.meta["last_step"])


def tracin(
    queries: Mapping[int, Features | FeatureStore],
    train: str | os.PathLike | Sequence[FeatureStore | str],
    topk: int | None = 10,
    aggregates: Sequence[str] = ("mean", "max", "sumsq"),
    chunk_rows: int = 8192,
    lr: str = "step",
) -> ScoreResult:
    """TracIn-CP scores of the queries against every trained example (see module docstring).

    Args:
        queries: last step b_k of each interval -> the query Features extracted from
            ``checkpoint-<b_k>`` (same query examples, same ProjectionConfig and layers as the callback).
        train: the callback's output directory, or its interval stores.
        topk: entries kept per query (None: every example).
        lr: ``"step"``: each row weighted by the learning rate of its own step (lr_r);
            ``"interval"``: every row of interval k by the interval's mean learning rate (TracIn-CP's
            and LESS's per-checkpoint weight), so that examples trained early and late in an interval
            count alike; best with ``InfluenceCallback(window=<steps per epoch>)``.

    Returns:
        ScoreResult over the U distinct train example ids (``metric="tracin"``); float64 sums, float32 results.
    """
    return _trajectory(queries, _stores(train, "gradient"), topk, aggregates, chunk_rows, "tracin", lr)


def less(
    queries: Mapping[int, Features | FeatureStore],
    train: str | os.PathLike | Sequence[FeatureStore | str],
    topk: int | None = 10,
    aggregates: Sequence[str] = ("mean", "max", "sumsq"),
    chunk_rows: int = 8192,
    lr: str = "step",
) -> ScoreResult:
    """LESS scores: learning-rate weighted cosines of query gradients with Adam update directions.

    Args:
        queries: last step b_k of each interval -> the query Features (plain gradients) extracted
            from ``checkpoint-<b_k>`` with the callback's ProjectionConfig and layers.
        train: the callback's output directory (its ``adam/`` stores are read), or its Adam interval stores.
        topk: entries kept per query (None: every example).
        lr: ``"step"``: each row weighted by the learning rate of its own step (lr_r);
            ``"interval"``: every row of interval k by the interval's mean learning rate (TracIn-CP's
            and LESS's per-checkpoint weight), so that examples trained early and late in an interval
            count alike; best with ``InfluenceCallback(window=<steps per epoch>)``.

    Returns:
        ScoreResult over the U distinct train example ids (``metric="less"``); float64 sums, float32 results.
        A zero query or train row has cosine 0.
    """
    return _trajectory(queries, _stores(train, "adam"), topk, aggregates, chunk_rows, "less", lr)


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def _row_lr(store: FeatureStore, lr: str) -> torch.Tensor:
    if lr == "step":
        return torch.tensor(store.meta["lr"], dtype=torch.float64)
    if "interval_lr" not in store.meta:
        raise ValueError(
            f"store {store.path} has no interval_lr (written by an older InfluenceCallback); use lr='step'"
        )
    return torch.full((len(store),), float(store.meta["interval_lr"]), dtype=torch.float64)


def _trajectory(queries, stores, topk, aggregates, chunk_rows, metric: str, lr: str) -> ScoreResult:
    if lr not in ("step", "interval"):
        raise ValueError(f"lr must be 'step' (each row's own step) or 'interval' (the interval's mean), got {lr!r}")
    aggregates = _aggregates(aggregates, AGGREGATES)
    steps = [_step(s) for s in stores]
    missing = [b for b in steps if b not in queries]
    if missing:
        raise ValueError(
            f"no query features for the intervals ending at steps {missing[:5]}: extract the queries from "
            f"checkpoint-<step> for every interval store (got steps {sorted(queries)[:5]})"
        )
    query = {b: _query_features(queries[b]) for b in steps}
    query_ids = query[steps[0]].ids
    for b in steps:
        if query[b].ids != query_ids:
            raise ValueError(
                f"the query features of step {b} hold other examples than those of step {steps[0]}; use the same "
                f"queries at every checkpoint"
            )
    column: dict = {}
    for s in stores:
        for i in s.ids:
            column.setdefault(i, len(column))
    S = torch.zeros(len(query_ids), len(column), dtype=torch.float64)
    for s, b in zip(stores, steps):
        try:
            _check_pair(query[b], s)
        except ValueError as exc:
            raise ValueError(
                f"the queries given for step {b} do not match the interval store {s.path.name} (the weights of "
                f"checkpoint-{b}): extract them from checkpoint-{b}; {exc}"
            ) from None
        q = query[b].data.to(torch.float64)
        q = _unit(q) if metric == "less" else q
        weight = _row_lr(s, lr)
        cols = torch.tensor([column[i] for i in s.ids], dtype=torch.long)
        for c in s.iter_chunks(chunk_rows):
            rows = slice(c.offset, c.offset + len(c.data))
            x = c.data.to(torch.float64)
            x = _unit(x) if metric == "less" else x
            S.index_add_(1, cols[rows], (q @ x.T) * weight[rows])
    return result_from_matrix(S, list(query_ids), list(column), topk, aggregates, metric)


def result_from_matrix(
    S: torch.Tensor, query_ids: list, train_ids: list, topk: int | None, aggregates: Sequence[str], metric: str
) -> ScoreResult:
    """A ScoreResult from a dense (Q, N) score matrix (top-k best first, ties to the lower row)."""
    k = S.shape[1] if topk is None else min(topk, S.shape[1])
    idx = torch.arange(S.shape[1]).expand(S.shape[0], -1)
    top = merge_topk(S, idx, k, None)
    named = {"sum": S.sum(0), "sumsq": (S * S).sum(0), "max": S.max(0).values, "mean": S.mean(0)}
    return ScoreResult(
        topk_values=top.values.float(),
        topk_indices=top.indices,
        topk_ids=[[train_ids[i] for i in row] for row in top.indices.tolist()],
        aggregates={a: named[a].float() for a in aggregates},
        query_ids=query_ids,
        train_ids=train_ids,
        metric=metric,
        precondition="identity",
    )
