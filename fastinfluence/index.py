"""Approximate top-k search over very large stores with a FAISS index (optional: ``pip install faiss-cpu``).

Streaming ``score`` stays the default and the reference: it reads every train row. An index
answers a query by visiting a fraction of them:

==========  ==============================================================  ======================
kind        FAISS index                                                       scores returned
==========  ==============================================================  ======================
``flat``    ``IndexFlatIP``: every row, exact                                 exact (float32)
``ivf``     ``IndexIVFFlat``: ``nlist`` k-means cells, ``nprobe`` searched    exact for the rows seen
``ivfpq``   ``IndexIVFPQ``: as ivf, rows compressed to ``m`` bytes (PQ)       approximate (PQ codes)
==========  ==============================================================  ======================

With ``refine=r`` (> 1) the index proposes r x k candidates and ``score`` re-ranks them with
their exact rows read from the store (memory-mapped), so the scores are exact and PQ's
coarse ranking only has to put the true top-k among r x k candidates.

``metric="dot"`` indexes the raw rows (inner product); ``metric="cosine"`` indexes rows
divided by their stored norms and searches with unit queries, so that inner product is
cosine. ``score(query, train, index=idx)`` preconditions the queries as streaming scoring
does and returns the same ``ScoreResult`` (top-k only: aggregates over every row need a
streaming pass). Recall of ivf/ivfpq against the exact top-k is measured in
``bench/index_recall.py`` (``bench/results/index_recall_cpu.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .features import Features, LayerSlice
from .store import FeatureStore

KINDS = ("flat", "ivf", "ivfpq")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("a FAISS index needs faiss: pip install faiss-cpu (or fastinfluence[faiss])") from None
    return faiss


@dataclass
class FeatureIndex:
    """A FAISS index over the rows of one store (or Features), row i being train row i.

    Attributes:
        index: the faiss index (inner product).
        metric: ``dot`` or ``cosine`` (how the rows were indexed).
        kind: one of KINDS.
        meta: config / fingerprint / layout / dtype of the indexed features (checked against queries).
        layout: layer name -> LayerSlice of the rows.
        ids: N example ids.
        refine: candidates per wanted entry re-ranked with the exact rows by ``score`` (1: none).
    """

    index: object
    metric: str
    kind: str
    meta: dict
    layout: dict[str, LayerSlice]
    ids: list
    refine: int = 1

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def nprobe(self) -> int | None:
        return getattr(self.index, "nprobe", None)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not hasattr(self.index, "nprobe"):
            raise ValueError(f"a {self.kind} index has no nprobe (only ivf and ivfpq do)")
        self.index.nprobe = int(value)

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (Q, D) query rows (already preconditioned) -> ((Q, k) float32 scores, (Q, k) int64 rows), best first."""
        x = q.to(torch.float32)
        if self.metric == "cosine":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        values, rows = self.index.search(np.ascontiguousarray(x.numpy()), k)
        return torch.from_numpy(values), torch.from_numpy(rows).to(torch.int64)

    def metadata(self) -> dict:
        return self.meta


def build_index(
    train: Features | FeatureStore,
    metric: str = "dot",
    kind: str = "flat",
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    nprobe: int = 32,
    train_rows: int | None = None,
    chunk_rows: int = 65536,
    seed: int = 0,
    refine: int = 1,
) -> FeatureIndex:
    """Index the rows of ``train`` (streamed ``chunk_rows`` at a time).

    Args:
        metric: ``dot`` or ``cosine``.
        kind: ``flat`` (exact), ``ivf`` or ``ivfpq`` (see module table).
        nlist: k-means cells of ivf/ivfpq (default ~4 sqrt(N)).
        m: PQ sub-vectors of ivfpq (bytes per row at nbits=8; must divide D; default D / 8).
        nprobe: cells searched per query (more: higher recall, slower).
        train_rows: rows the k-means (and PQ) are fitted on, an even sample of the store
            (default min(N, max(64 nlist, 50k))).
        refine: re-rank refine x k candidates with the exact rows at query time (see module docstring).
    """
    faiss = _faiss()
    if metric not in ("dot", "cosine"):
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    N, D = len(train), train.dim
    if N == 0:
        raise ValueError("cannot index an empty store")
    if not isinstance(refine, int) or refine < 1:
        raise ValueError(f"refine must be an int >= 1, got {refine!r}")

    def rows(data: torch.Tensor, norms: torch.Tensor) -> np.ndarray:
        x = data.to(torch.float32)
        if metric == "cosine":
            x = x / norms.to(torch.float32)[:, None].clamp_min(torch.finfo(torch.float32).tiny)
        return np.ascontiguousarray(x.numpy())

    if kind == "flat":
        index = faiss.IndexFlatIP(D)
    else:
        nlist = nlist or max(1, min(N // 39, int(4 * N**0.5)))
        quantizer = faiss.IndexFlatIP(D)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = m or max(1, D // 8)
            if D % m:
                raise ValueError(f"ivfpq needs m dividing the feature width D={D}; got m={m}")
            index = faiss.IndexIVFPQ(quantizer, D, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        n_fit = min(N, train_rows or max(64 * nlist, 50_000))
        cells = max(nlist, 2**nbits if kind == "ivfpq" else 0)
        if n_fit < cells:
            what = f"nlist={nlist}" if cells == nlist else f"2**nbits={cells} PQ centroids (nbits={nbits})"
            raise ValueError(
                f"{kind} fits {what} on {n_fit} rows, fewer than that: lower nlist"
                f"{' / nbits' if kind == 'ivfpq' else ''}, give train_rows >= {cells} (of {N} rows), or use "
                "kind='flat' (exact; fine below ~1M rows)"
            )
        pick = torch.linspace(0, N - 1, n_fit).round().long().unique().tolist()
        index.train(rows(train.rows(pick), train.norms[pick]))
        index.nprobe = min(nprobe, nlist)
    for c in train.iter_chunks(chunk_rows):
        index.add(rows(c.data, c.norms))
    return FeatureIndex(index, metric, kind, train.metadata(), dict(train.layout), list(train.ids), refine)


def index_topk(index: FeatureIndex, query, train, metric: str, pre, topk: int, layer_normalize: bool):
    """``score(..., index=index)``'s search: (Q, k) values and train rows of the preconditioned queries.

    ``query``: Features of the queries; ``pre``: the fitted preconditioner or None. The scores
    are those of the index (exact for ``flat``), re-ranked exactly when ``index.refine > 1``.
    """
    from .store import check_same_origin

    if index.metric != metric:
        raise ValueError(
            f"the index was built for metric={index.metric!r}, this score asks metric={metric!r}; build one per metric"
        )
    if layer_normalize:
        raise ValueError("layer_normalize=True is not supported with an index: score without index= (streaming)")
    if len(index) != len(train):
        raise ValueError(
            f"the index holds {len(index)} rows but the train features have {len(train)}: rebuild it from these "
            f"features"
        )
    check_same_origin(index.meta, train.metadata(), "the index", "the train features")
    q = pre.apply(query.data) if pre is not None else query.data
    k = min(topk, len(index))
    values, rows = index.search(q, min(k * index.refine, len(index)))
    if index.refine > 1:
        values, rows = _rerank(q, train, rows, k, metric)
    return values, rows


def _rerank(q: torch.Tensor, train, rows: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of each query's candidate rows (-1: none found), best k first."""
    from .ops import merge_topk

    valid = rows >= 0
    flat = rows.clamp_min(0).reshape(-1)
    x = train.rows(flat.tolist()).to(torch.float32).reshape(*rows.shape, -1)
    qq = q.to(torch.float32)
    S = torch.einsum("qd,qcd->qc", qq, x)
    if metric == "cosine":
        tiny = torch.finfo(torch.float32).tiny
        norms = train.norms[flat].float().reshape(rows.shape)
        S = S / (qq.norm(dim=1, keepdim=True).clamp_min(tiny) * norms.clamp_min(tiny))
    S = torch.where(valid, S, float("-inf"))
    top = merge_topk(S, torch.where(valid, rows, torch.iinfo(torch.int64).max), k)
    return top.values, top.indices
