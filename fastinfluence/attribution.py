"""Attribution quality: how well influence scores predict what training examples do.

``lds`` (linear datamodeling score), ``recall_at_k`` (planted sources ranked first) and
``spearman``; also reachable as ``fastinfluence.evaluate.lds`` and so on.
"""

from __future__ import annotations

import torch


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(n,) float64 ranks 1..n of x, ties given the mean of the ranks they span."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # mean of the ranks (end - count + 1) .. end
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two (n,) tensors (ties as average ranks); NaN if either is constant."""
    if x.shape != y.shape or x.dim() != 1 or len(x) < 2:
        raise ValueError(
            f"spearman needs two 1-D tensors of the same length >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def _subset_masks(subsets, n: int) -> torch.Tensor:
    if isinstance(subsets, torch.Tensor) and subsets.dtype == torch.bool:
        if subsets.dim() != 2 or subsets.shape[1] != n:
            raise ValueError(
                f"subsets mask must have shape (M, {n}) for {n} train examples, got {tuple(subsets.shape)}"
            )
        return subsets
    masks = torch.zeros(len(subsets), n, dtype=torch.bool)
    for m, rows in enumerate(subsets):
        rows = torch.as_tensor(rows, dtype=torch.long)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise ValueError(f"subset {m} holds train rows outside 0..{n - 1}")
        masks[m, rows] = True
    return masks


def lds(scores: torch.Tensor, subsets, losses: torch.Tensor, per_query: bool = False):
    """Linear datamodeling score (Park et al. 2023, TRAK): do summed influences rank retrained models?

    For M random subsets S_m of the N train examples, a model is retrained on each; the
    prediction for query q is sum_{i in S_m} scores[q, i], and

        LDS = mean_q Spearman_m( sum_{i in S_m} scores[q, i],  -losses[m, q] )

    Influence is oriented as elsewhere in fastinfluence (a high score means the train example
    lowers the query's loss), so a perfect attribution gives 1 and chance gives about 0.

    Args:
        scores: (Q, N) influence scores.
        subsets: (M, N) bool mask, or M lists of train rows.
        losses: (M, Q) loss of each query under the model retrained on each subset.
        per_query: return the (Q,) per-query correlations (NaN where a query's losses are constant).

    Returns:
        The mean over the queries whose correlation is defined (a float), or the (Q,) tensor.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Q, N), got shape {tuple(scores.shape)}")
    Q, N = scores.shape
    masks = _subset_masks(subsets, N)
    M = len(masks)
    if tuple(losses.shape) != (M, Q):
        raise ValueError(
            f"losses must be (M, Q) = ({M}, {Q}): one loss per retrained subset and query, got {tuple(losses.shape)}"
        )
    if M < 2:
        raise ValueError("lds needs at least 2 retrained subsets to correlate")
    predicted = masks.double() @ scores.double().T  # (M, Q)
    rho = torch.tensor([spearman(predicted[:, q], -losses[:, q].double()) for q in range(Q)], dtype=torch.float64)
    if per_query:
        return rho
    defined = rho[~rho.isnan()]
    if len(defined) == 0:
        raise ValueError("lds is undefined: every query's predictions or losses are constant across the subsets")
    return float(defined.mean())


def recall_at_k(scores, sources, k: int = 1) -> float:
    """Mean over queries of |top-k train rows of q  ∩  sources[q]| / |sources[q]|.

    ``scores``: (Q, N) influence scores (ties go to the lower row, as in ``score``), or a
    ``ScoreResult`` whose top-k holds at least k entries. ``sources``: per query a train row or
    a collection of rows (its planted sources). With one source per query and k = 1 this is the
    rate at which the planted source is ranked first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 2:
            raise ValueError(f"scores must be (Q, N), got shape {tuple(scores.shape)}")
        if k > scores.shape[1]:
            raise ValueError(f"k = {k} exceeds the {scores.shape[1]} train examples")
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    else:
        top = scores.topk_indices
        if top.shape[1] < k:
            raise ValueError(f"the ScoreResult keeps {top.shape[1]} entries per query; score with topk >= {k}")
        top = top[:, :k]
    if len(sources) != len(top):
        raise ValueError(f"sources has {len(sources)} entries for {len(top)} queries: give each query its planted rows")
    total = 0.0
    for q, src in enumerate(sources):
        src = {int(src)} if isinstance(src, int) or (hasattr(src, "dim") and src.dim() == 0) else {int(s) for s in src}
        if not src:
            raise ValueError(f"query {q} has no planted source")
        total += len(src & set(top[q].tolist())) / len(src)
    return total / len(top)
