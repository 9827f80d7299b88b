"""Scoring a fixed query set against train batches in one pass, nothing written.

When only the top-k (or the aggregates) of a known query set are wanted, the train
features need never be stored: each train batch is extracted, scored against the query
(preconditioned once, before the pass) and dropped. The result equals ``score`` on a store
of the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from . import distributed as dist
from .ops import score_topk
from .precondition import Preconditioner
from .scoring import METRICS, ScoreResult, _aggregates, _check_pair, _query_features, _Scoring


def score_batches(
    extractor,
    query,
    train_batches: Iterable[dict],
    metric: str = "dot",
    precondition: Preconditioner | str | None = None,
    topk: int = 10,
    layer_normalize: bool = False,
    aggregates: Sequence[str] = ("mean", "max", "sumsq"),
    device: str | torch.device | None = None,
) -> ScoreResult:
    """Top-k and aggregates of ``query`` against the features of ``train_batches``, one pass.

    Args:
        extractor: the ``GradientExtractor`` that made ``query`` (same config and model).
        query: Q query examples (Features or a FeatureStore).
        train_batches: HF-style batch dicts, extracted one at a time and never kept.
        metric, layer_normalize, aggregates: as in ``score``.
        precondition: None / ``"identity"``, or a ``Preconditioner`` already fitted (a store-free
            pass cannot fit one: fit it on a store, or on a sample, first).
        topk: how many train examples to keep per query (the full matrix is ``score``'s job).
        device: where the scores are computed (default: the CUDA device when present).

    Returns:
        ScoreResult without ``matrix`` or ``layer_scores``; ``topk_indices`` count train
        examples in the order of ``train_batches``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    aggregates = _aggregates(aggregates)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if isinstance(precondition, str) and precondition != "identity":
        raise ValueError(
            f"score_batches needs a fitted Preconditioner, not {precondition!r}: fit one on a store "
            "(fastinfluence.precondition.load_or_fit) or score a store with score()"
        )
    if dist.rank_world()[1] > 1:
        raise ValueError("score_batches runs in one process; under torch.distributed write a store and use score()")
    pre = precondition if isinstance(precondition, Preconditioner) else None
    qf = _query_features(query)
    dtype = torch.float64 if torch.float64 in (qf.data.dtype, extractor.config.torch_dtype) else torch.float32
    scoring = _Scoring(dict(extractor.layout), metric, layer_normalize, dtype)
    q, q_scale = scoring.query(qf.data, pre)
    device = torch.device(device) if device is not None else dist.default_device()
    q, q_scale = q.to(device), (q_scale.to(device) if q_scale is not None else None)
    top, aggs, ids, seen = None, [], [], 0
    for f in extractor.iter_features(train_batches):
        if seen == 0:
            _check_pair(qf, f)
        x, t_scale = scoring.train(f.data.to(device), f.norms.to(device))
        top, a = score_topk(q, x, topk, q_scale, t_scale, seen, top)
        aggs.append(a.float().cpu())
        ids += list(f.ids)
        seen += len(x)
    if seen == 0:
        raise ValueError("train_batches hold no example")
    agg = torch.cat(aggs, dim=1)
    Q = len(qf)
    named = {"sum": agg[0], "sumsq": agg[1], "max": agg[2], "mean": agg[0] / max(Q, 1)}
    indices = top.indices.cpu()
    return ScoreResult(
        topk_values=top.values.float().cpu(),
        topk_indices=indices,
        topk_ids=[[ids[i] for i in row] for row in indices.tolist()],
        aggregates={k: named[k] for k in aggregates},
        query_ids=list(qf.ids),
        train_ids=ids,
        metric=metric,
        precondition=pre.kind if pre is not None else "identity",
    )
