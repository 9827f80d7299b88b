"""Scores of query features against a chunk of train features, with a running top-k.

One call handles one chunk of train rows:

    S = (query @ train^T) * query_scale[:, None] * train_scale[None, :]      (Q, n)

merged into the running per-query top-k (``prev``) and reduced over the queries into
per-train-row aggregates (sum, sum of squares, max). Cosine scores are the dot product
with ``query_scale = 1/||q||`` and ``train_scale = 1/||x||``.

Ordering: values descending; equal values keep the lower train index first (chunks are
fed in increasing index order, so ``prev`` entries come before new ones).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import dispatch, register_op
from ._common import acc_dtype


class TopK(NamedTuple):
    """Running top-k. values: (Q, k) float32/float64, indices: (Q, k) int64 (global train rows)."""

    values: torch.Tensor
    indices: torch.Tensor


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int, prev: TopK | None = None) -> TopK:
    """Top-k of ``prev`` and the new candidates (``values``/``indices``: (Q, n)), ties to lower index."""
    if prev is not None:
        values = torch.cat([prev.values.to(values.dtype), values], dim=1)
        indices = torch.cat([prev.indices, indices], dim=1)
    # Sort by index first so that the stable value sort breaks ties by index.
    order = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : min(k, values.shape[1])]
    return TopK(values.gather(1, order), indices.gather(1, order))


def scores_and_aggregates(query, train, query_scale=None, train_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled score matrix S (Q, n) and its (3, n) aggregates over the queries (sum, sumsq, max).

    Shared by the reference and the backends that only replace the top-k selection.
    """
    dtype = acc_dtype(query, train)
    S = query.to(dtype) @ train.to(dtype).T
    if query_scale is not None:
        S = S * query_scale.to(dtype)[:, None]
    if train_scale is not None:
        S = S * train_scale.to(dtype)[None, :]
    return S.contiguous(), torch.stack([S.sum(0), (S * S).sum(0), S.amax(0)])


def score_topk_reference(query, train, k, query_scale=None, train_scale=None, index_offset=0, prev=None):
    S, aggregates = scores_and_aggregates(query, train, query_scale, train_scale)
    idx = torch.arange(index_offset, index_offset + train.shape[0], device=train.device)
    return merge_topk(S, idx.expand(S.shape[0], -1), k, prev), aggregates


register_op("score_topk", score_topk_reference)


def score_topk(
    query: torch.Tensor,
    train: torch.Tensor,
    k: int,
    query_scale: torch.Tensor | None = None,
    train_scale: torch.Tensor | None = None,
    index_offset: int = 0,
    prev: TopK | None = None,
) -> tuple[TopK, torch.Tensor]:
    """Score one train chunk and merge it into the running top-k.

    Args:
        query: (Q, D) float32/bfloat16/float16/float64 features.
        train: (n, D) features of this chunk (rows ``index_offset .. index_offset + n``).
        k: top-k size (>= 1); the result has min(k, rows seen so far) columns.
        query_scale: (Q,) or None. train_scale: (n,) or None.
        prev: running top-k from earlier chunks, or None.

    Returns:
        (TopK(values (Q, k'), indices (Q, k') int64), aggregates (3, n)): rows of
        ``aggregates`` are the sum, sum of squares and max of the chunk's scores over the
        queries. Accumulation in float32 (float64 for float64 inputs).
    """
    if query.dim() != 2 or train.dim() != 2 or query.shape[1] != train.shape[1]:
        raise ValueError(
            f"score_topk: query {tuple(query.shape)} and train {tuple(train.shape)} must be (Q, D) and (n, D)"
        )
    if k < 1:
        raise ValueError(f"score_topk: k must be >= 1, got {k}")
    if query_scale is not None and tuple(query_scale.shape) != (query.shape[0],):
        raise ValueError(f"query_scale must have shape ({query.shape[0]},), got {tuple(query_scale.shape)}")
    if train_scale is not None and tuple(train_scale.shape) != (train.shape[0],):
        raise ValueError(f"train_scale must have shape ({train.shape[0]},), got {tuple(train_scale.shape)}")
    return dispatch(
        "score_topk",
        query.device,
        query=query,
        train=train,
        k=k,
        query_scale=query_scale,
        train_scale=train_scale,
        index_offset=index_offset,
        prev=prev,
    )
