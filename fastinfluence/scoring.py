"""Influence scores of query examples against train examples, streamed in bounded chunks.

For query q and train row i (features phi, layer blocks phi_l):

    dot:     s(q, i) = sum_l <H^-1 phi_q, phi_i>_l
    cosine:  s(q, i) = <H^-1 phi_q, phi_i> / (||H^-1 phi_q|| ||phi_i||)

with H the preconditioner (``precondition.py``, identity by default). With
``layer_normalize=True`` each layer block of both sides is scaled to unit norm first
(RapidIn's layer-wise normalisation). The train side is read chunk by chunk (from a
FeatureStore or in-memory Features through the same interface), so peak memory depends
on ``chunk_rows`` and the number of queries, not on the number of train rows; each chunk
goes through ``ops.score_topk``, which keeps the running top-k and the per-train aggregates.
Under ``torch.distributed`` the ranks split the train rows and the top-k is gathered.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as dist
from . import errors
from .features import Features, FeatureSource, LayerSlice
from .index import index_topk
from .ops import TopK, merge_topk, score_topk
from .ops.score_topk import scores_and_aggregates
from .options import METRICS, ScoreOptions, check_damping
from .options import SCORE_AGGREGATES as AGGREGATES
from .outputs import NO_SPACE, check_file, disk_full, temporary
from .precondition import KINDS, Preconditioner, load_or_fit
from .store import FeatureStore, StoreError, check_same_origin, normalize_metadata

MATRIX_MAX_BYTES = 8 << 30


@dataclass
class ScoreResult:
    """Scores of Q queries against N train rows.

    Attributes:
        topk_values: (Q, k) float32, best first; k = min(topk, N).
        topk_indices: (Q, k) int64 train rows (ties go to the lower row).
        topk_ids: Q lists of k train example ids.
        aggregates: name -> (N,) float32 over the queries (``mean``, ``max``, ``sum``, ``sumsq``).
        query_ids, train_ids: example ids of both sides.
        layer_scores: layer -> (Q, k) float32 score of each top-k pair restricted to that
            layer (they sum to ``topk_values``), when asked with ``per_layer=True``.
        matrix: (Q, N) float32 full score matrix: memory-mapped when asked with ``matrix_path``,
            in memory with ``matrix=True``.
    """

    topk_values: torch.Tensor
    topk_indices: torch.Tensor
    topk_ids: list[list]
    aggregates: dict[str, torch.Tensor]
    query_ids: list
    train_ids: list
    metric: str
    precondition: str
    layer_scores: dict[str, torch.Tensor] | None = None
    matrix: np.ndarray | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- scaling


def _layer_norms(x: torch.Tensor, layout: dict[str, LayerSlice]) -> torch.Tensor:
    """(n, L) norms of each layer block of x (n, D)."""
    return torch.stack([x[:, sl.start : sl.stop].norm(dim=1) for sl in layout.values()], dim=1)


def _inverse(x: torch.Tensor) -> torch.Tensor:
    """1/x, with 0 where x is 0 (an all-zero row scores 0, not NaN)."""
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def _normalize_layers(x: torch.Tensor, layout: dict[str, LayerSlice]) -> torch.Tensor:
    inv = _inverse(_layer_norms(x, layout))
    out = x.clone()
    for j, sl in enumerate(layout.values()):
        out[:, sl.start : sl.stop] *= inv[:, j : j + 1]
    return out


@dataclass
class _Scoring:
    """What turns raw features into the vectors and scales that ``score_topk`` takes."""

    layout: dict[str, LayerSlice]
    metric: str
    layer_normalize: bool
    dtype: torch.dtype

    def query(self, phi: torch.Tensor, pre: Preconditioner | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = pre.apply(phi) if pre is not None else phi.to(torch.float64)
        if self.layer_normalize:
            q = _normalize_layers(q, self.layout)
        scale = _inverse(q.norm(dim=1)).to(self.dtype) if self.metric == "cosine" else None
        return q.to(self.dtype), scale

    def train(self, x: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.layer_normalize:
            x = _normalize_layers(x.to(self.dtype), self.layout)
            norms = x.norm(dim=1)
        return x, (_inverse(norms.to(self.dtype)) if self.metric == "cosine" else None)


# ----------------------------------------------------------------------------- helpers


def _check_pair(query, train) -> None:
    def relaxed(src):
        m = normalize_metadata(src.metadata())
        if m["config"]:
            m["config"] = {k: v for k, v in m["config"].items() if k != "dtype"}
        return dict(m, dtype=None)

    check_same_origin(relaxed(query), relaxed(train), "the query features", "the train features")


def _source(x, side: str) -> FeatureSource:
    """``x`` as a feature source: Features or a FeatureStore as they are, a store directory's path opened."""
    if isinstance(x, (str, os.PathLike)):
        return FeatureStore.open(x)
    if isinstance(x, (Features, FeatureStore)) or all(
        callable(getattr(x, m, None)) for m in ("metadata", "iter_chunks", "to_features")
    ):
        return x
    raise TypeError(
        f"{side} must be Features (GradientExtractor.extract(batches)), a FeatureStore or the path of a store "
        f"directory, got {type(x).__name__}: extract the features of the batches first"
    )


def _aggregates(aggregates, allowed: Sequence[str] = AGGREGATES) -> tuple[str, ...]:
    """The names of the aggregates asked for: a sequence of names, or one name as a string."""
    if isinstance(aggregates, str):
        aggregates = (aggregates,)
    try:
        aggregates = tuple(aggregates)
    except TypeError:
        raise TypeError(f"aggregates must be a list of names from {allowed}, got {aggregates!r}") from None
    unknown = [a for a in aggregates if a not in allowed]
    if unknown:
        raise errors.FastInfluenceError(f"unknown aggregates {unknown}; choose from {allowed}", "aggregates")
    return aggregates


def _query_features(query) -> Features:
    if isinstance(query, FeatureSource):
        return query.to_features()
    raise TypeError(f"query must be Features or a FeatureStore, got {type(query).__name__}")


def _preconditioner(precondition, train, damping, chunk_rows) -> Preconditioner | None:
    check_damping(damping)
    if precondition is None or precondition == "identity":
        return None
    if isinstance(precondition, Preconditioner):
        return precondition
    if precondition not in KINDS:
        raise ValueError(
            f"precondition must be None, a Preconditioner or one of {', '.join(KINDS)}; got {precondition!r}"
        )
    return load_or_fit(train, precondition, damping=damping, chunk_rows=chunk_rows)


def _rank_rows(train) -> tuple[int, int]:
    """This rank's train rows [start, stop): whole shards for a store (so shards are checked whole)."""
    rank, world = dist.rank_world()
    n = len(train)
    if world == 1:
        return 0, n
    bounds = train.row_bounds()

    def cut(r):
        return min(bounds, key=lambda b: (abs(b * world - r * n), b))

    return cut(rank), cut(rank + 1)


def _gather_topk(top: TopK | None, Q: int, k: int, n: int) -> TopK:
    """Merge the ranks' top-k; a rank with fewer than k rows pads with -inf entries that sort last."""
    vals = torch.full((Q, k), float("-inf"))
    idx = torch.full((Q, k), torch.iinfo(torch.int64).max, dtype=torch.int64)
    if top is not None:
        vals[:, : top.values.shape[1]] = top.values.float()
        idx[:, : top.indices.shape[1]] = top.indices
    if dist.is_distributed():
        return merge_topk(dist.all_gather_cat(vals, dim=1), dist.all_gather_cat(idx, dim=1), min(k, n))
    return TopK(vals[:, : min(k, n)], idx[:, : min(k, n)])


def _open_matrix(path: Path, Q: int, N: int) -> tuple[np.memmap, Path]:
    """The (Q, N) float32 matrix memory-mapped under a temporary name beside ``path`` (renamed by
    ``_commit_matrix`` when whole); its blocks reserved, so a full disk fails here."""
    rank, _ = dist.rank_world()
    tmp = dist.broadcast_object(temporary(path) if rank == 0 else None)
    error = None
    if rank == 0:
        try:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(Q, N)).flush()
            _reserve(tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in NO_SPACE:
                error = str(disk_full(path, f"the {Q} x {N} float32 score matrix ({errors.label('matrix_path')})", exc))
            else:
                error = f"cannot write the score matrix {path} ({Q} x {N} float32): {exc.strerror or exc}"
    error = dist.broadcast_object(error)
    if error is not None:
        raise OSError(error)
    dist.barrier()
    return np.lib.format.open_memmap(tmp, mode="r+"), tmp


def _commit_matrix(tmp: Path, path: Path) -> np.memmap:
    """Rename the whole matrix to its name (rank 0) and map it from there."""
    dist.barrier()
    if dist.rank_world()[0] == 0:
        os.replace(tmp, path)
    dist.barrier()
    return np.lib.format.open_memmap(path, mode="r+")


def _reserve(path: Path) -> None:
    """Allocate the memory-mapped file's blocks now: a full disk then fails here with ENOSPC
    instead of killing the process with SIGBUS when a page is first written."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            path.unlink(missing_ok=True)
            raise
    finally:
        os.close(fd)


def _check_store_complete(source, allow_incomplete: bool, side: str) -> None:
    if isinstance(source, FeatureStore) and not source.complete and not allow_incomplete:
        raise StoreError(
            f"the {side} store {source.path} is incomplete ({source.num_rows} of {source.expected_rows} examples): "
            "its extraction was interrupted or is still running; re-run the same extraction to resume it, or "
            f"pass {errors.name('allow_incomplete', True)} to score the rows it has"
        )
    if len(source) == 0:
        raise StoreError(f"the {side} features hold no rows; extract some examples first")


# ----------------------------------------------------------------------------- API


def score(query: FeatureSource, train: FeatureSource, options: ScoreOptions | None = None, **kwargs) -> ScoreResult:
    """Score every query against every train row, streaming the train rows.

        fi.score(query, train, metric="cosine", topk=5)
        fi.score(query, train, ScoreOptions(metric="cosine", topk=5))   # the same

    Args:
        query: Q examples (Features or a small FeatureStore, loaded whole; a store directory's
            path is opened as ``FeatureStore.open(path)``).
        train: N examples (Features or FeatureStore, streamed ``chunk_rows`` at a time; or a
            store directory's path, opened).
        options: a ``ScoreOptions`` (its docstring describes every field: metric, precondition,
            topk, matrix_path, ...), or its fields as keyword arguments; not both.
    """
    o = ScoreOptions.resolve(options, kwargs, "score")
    query, train = _source(query, "query"), _source(train, "train")
    aggregates = o.aggregates
    if aggregates is None:
        aggregates = () if o.index is not None else ("mean", "max", "sumsq")
    aggregates = _aggregates(aggregates)
    if o.index is not None and len(aggregates):
        raise errors.FastInfluenceError(
            f"aggregates {aggregates} need a streaming pass over every train row: score without index= for them",
            "aggregates",
        )
    _check_store_complete(train, o.allow_incomplete, "train")
    _check_store_complete(query, o.allow_incomplete, "query")
    topk = len(train) if o.topk is None else o.topk
    metric, matrix, matrix_path, layer_normalize = o.metric, o.matrix, o.matrix_path, o.layer_normalize
    if matrix_path is not None:
        need = len(query) * len(train) * 4 + 4096
        matrix_path = check_file(matrix_path, errors.label("matrix_path"), o.overwrite, need_bytes=need)
    if matrix and len(query) * len(train) * 4 > MATRIX_MAX_BYTES:
        raise errors.FastInfluenceError(
            f"the {len(query)} x {len(train)} score matrix needs {len(query) * len(train) * 4 / 2**30:.1f} GiB; "
            f"matrix=True keeps at most {MATRIX_MAX_BYTES / 2**30:.0f} GiB in memory: write it with matrix_path= "
            f"instead",
            "matrix",
        )
    _check_pair(query, train)
    qf = _query_features(query)
    layout = dict(train.layout)
    dtype = torch.float64 if torch.float64 in (qf.data.dtype, train.dtype) else torch.float32
    pre = _preconditioner(o.precondition, train, o.damping, o.chunk_rows)
    if o.index is not None:
        if matrix or matrix_path is not None or o.per_layer:
            raise errors.FastInfluenceError(
                "matrix, matrix_path and per_layer need a streaming pass: score without index= for them", "index"
            )
        values, rows = index_topk(o.index, qf, train, metric, pre, topk, layer_normalize)
        train_ids = list(train.ids)
        return ScoreResult(
            topk_values=values,
            topk_indices=rows,
            topk_ids=[[train_ids[i] for i in row] for row in rows.tolist()],
            aggregates={},
            query_ids=list(qf.ids),
            train_ids=train_ids,
            metric=metric,
            precondition=pre.kind if pre is not None else "identity",
        )
    scoring = _Scoring(layout, metric, layer_normalize, dtype)
    q, q_scale = scoring.query(qf.data, pre)
    device = torch.device(o.device) if o.device is not None else dist.default_device()
    q, q_scale = q.to(device), (q_scale.to(device) if q_scale is not None else None)
    N, Q = len(train), len(qf)
    start, stop = _rank_rows(train)
    tmp = None
    if matrix:
        matrix = np.zeros((Q, N), dtype=np.float32)
    else:
        matrix, tmp = _open_matrix(matrix_path, Q, N) if matrix_path is not None else (None, None)
    try:
        top, agg = _stream(scoring, q, q_scale, train, topk, o.chunk_rows, (start, stop), matrix, o.progress)
    except BaseException:
        if tmp is not None and dist.rank_world()[0] == 0:
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None:
        del matrix
        matrix = _commit_matrix(tmp, matrix_path)
    agg = dist.all_reduce_sum(agg)
    top = _gather_topk(top, Q, topk, N)
    named = {"sum": agg[0], "sumsq": agg[1], "max": agg[2], "mean": agg[0] / max(Q, 1)}
    train_ids = list(train.ids)
    result = ScoreResult(
        topk_values=top.values.float(),
        topk_indices=top.indices,
        topk_ids=[[train_ids[i] for i in row] for row in top.indices.tolist()],
        aggregates={k: named[k] for k in aggregates},
        query_ids=list(qf.ids),
        train_ids=train_ids,
        metric=metric,
        precondition=pre.kind if pre is not None else "identity",
        matrix=matrix,
    )
    if o.per_layer:
        result.layer_scores = _layer_scores(
            scoring, q.cpu(), q_scale.cpu() if q_scale is not None else None, train, top.indices
        )
    return result


def _half_query(q: torch.Tensor, q_scale: torch.Tensor | None, x: torch.Tensor):
    """On a GPU, half-precision train rows meet a query of the same dtype so that the fused
    kernel runs (float32 accumulation). The query rows are cast at unit norm, their norms
    moved into the scale: a preconditioned query (H^-1 phi) easily exceeds float16's range.
    On the CPU the query stays as it is."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return q, q_scale
    norms = q.norm(dim=1).clamp_min(torch.finfo(q.dtype).tiny)
    scale = norms if q_scale is None else norms * q_scale
    return (q / norms[:, None]).to(x.dtype), scale.to(q.dtype)


def _stream(
    scoring: _Scoring, q, q_scale, train, topk, chunk_rows, rows, matrix, progress
) -> tuple[TopK | None, torch.Tensor]:
    """Running top-k and (3, N) aggregates (zero outside ``rows``) over train rows [start, stop)."""
    agg = torch.zeros(3, len(train), dtype=torch.float32)
    top = None
    bar = tqdm(total=rows[1] - rows[0], unit="row", desc="score", disable=not (progress and dist.rank_world()[0] == 0))
    for c in train.iter_chunks(chunk_rows, *rows):
        x, t_scale = scoring.train(c.data.to(q.device, non_blocking=True), c.norms.to(q.device))
        qx, qs = _half_query(q, q_scale, x)
        if matrix is None:
            top, a = score_topk(qx, x, topk, qs, t_scale, c.offset, top)
        else:  # the full matrix is wanted: compute each score tile once and select from it
            S, a = scores_and_aggregates(qx, x, qs, t_scale)
            idx = torch.arange(c.offset, c.offset + len(x), device=S.device)
            top = merge_topk(S, idx.expand(S.shape[0], -1), topk, top)
            matrix[:, c.offset : c.offset + len(x)] = S.float().cpu().numpy()
        agg[:, c.offset : c.offset + len(x)] = a.float().cpu()
        bar.update(len(x))
    bar.close()
    if isinstance(matrix, np.memmap):
        matrix.flush()
        dist.barrier()
    elif matrix is not None:  # in memory: each rank filled its rows' columns, zeros elsewhere
        matrix[:] = dist.all_reduce_sum(torch.from_numpy(matrix)).numpy()
    return (TopK(top.values.cpu(), top.indices.cpu()) if top is not None else None), agg


def _train_rows(train: FeatureSource, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return train.rows(indices), train.norms[indices]


def _layer_scores(scoring: _Scoring, q, q_scale, train, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """layer -> (Q, k) share of each top-k score; the shares sum to the score."""
    Q, k = indices.shape
    x, norms = _train_rows(train, indices.reshape(-1).tolist())
    x, t_scale = scoring.train(x.to(scoring.dtype), norms)
    x = x.to(scoring.dtype).reshape(Q, k, -1)
    scale = torch.ones(Q, k, dtype=scoring.dtype)
    if q_scale is not None:
        scale = scale * q_scale[:, None] * t_scale.reshape(Q, k)
    return {
        name: (torch.einsum("qd,qkd->qk", q[:, sl.start : sl.stop], x[:, :, sl.start : sl.stop]) * scale).float()
        for name, sl in scoring.layout.items()
    }


def self_influence(
    train: FeatureSource,
    precondition: str | Preconditioner | None = None,
    damping: float | None = None,
    chunk_rows: int = 8192,
) -> torch.Tensor:
    """(N,) float32 self-influence <H^-1 phi_i, phi_i> of every train row, streamed."""
    train = _source(train, "train")
    _check_store_complete(train, False, "train")
    pre = _preconditioner(precondition, train, damping, chunk_rows)
    out = torch.empty(len(train), dtype=torch.float32)
    for c in train.iter_chunks(chunk_rows):
        x = c.data.to(torch.float64)
        hx = pre.apply(x) if pre is not None else x
        out[c.offset : c.offset + len(x)] = (hx * x).sum(1).float()
    return out


def token_scores(
    query: FeatureSource,
    train: FeatureSource,
    rows: Sequence[int],
    metric: str = "dot",
    precondition: str | Preconditioner | None = None,
    layer_normalize: bool = False,
    damping: float | None = None,
) -> list[torch.Tensor]:
    """Per-token scores of chosen train examples: one (Q, T_i) float32 tensor per row.

    s_it = sum_l c_l g~_it^T (H^-1 Phi_q)_l a~_it from the stored token factors, with the
    same scaling c_l as ``score``, so that s_i.sum(1) equals ``score``'s value for (q, i). An
    MoE expert's layer adds its share at the tokens routed to it only (``token_positions``).
    """
    query, train = _source(query, "query"), _source(train, "train")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    _check_pair(query, train)
    qf = _query_features(query)
    layout = dict(train.layout)
    if "flat" in layout:
        raise ValueError(
            f"per-token scores need factorized features ({errors.name('ProjectionConfig.mode', 'factorized')}), not "
            f"flat ones"
        )
    scoring = _Scoring(layout, metric, layer_normalize, torch.float64)
    q, q_scale = scoring.query(qf.data, _preconditioner(precondition, train, damping, 8192))
    rows = [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < len(train)]
    if bad:
        raise IndexError(f"token_scores: rows {bad[:5]} are outside the train rows 0..{len(train) - 1}")
    if not rows:
        raise ValueError("token_scores: rows is empty; give the train rows to explain")
    x, norms = _train_rows(train, rows)
    x = x.to(torch.float64)
    _, t_scale = scoring.train(x, norms)
    layer_w = (
        _inverse(_layer_norms(x, layout))
        if layer_normalize
        else torch.ones(len(rows), len(layout), dtype=torch.float64)
    )
    out = []
    for j, row in enumerate(rows):
        a, g = _token_factors(train, row)
        T, positions = _token_positions(train, row, a)
        s = q.new_zeros(len(q), T)
        for l, (name, sl) in enumerate(layout.items()):
            Phi = q[:, sl.start : sl.stop].reshape(-1, *sl.shape)
            share = layer_w[j, l] * torch.einsum("to,qoi,ti->qt", g[name].double(), Phi, a[name].double())
            if name in positions:  # a routed layer's rows: the tokens routed to it (a token's rows add up)
                s.index_add_(1, positions[name].to(s.device), share)
            else:
                s = s + share
        if q_scale is not None:
            s = s * q_scale[:, None] * t_scale[j]
        out.append(s.float())
    return out


def _token_factors(train: FeatureSource, row: int):
    return train.token_factors(row)


def _token_positions(train: FeatureSource, row: int, a: dict[str, torch.Tensor]) -> tuple[int, dict]:
    """(T, routed layers' token positions) of ``row``; a source without ``token_positions`` has no routed layers."""
    if hasattr(train, "token_positions"):
        return train.token_positions(row)
    return next(iter(a.values())).shape[0], {}
