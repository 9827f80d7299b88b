"""FAISS index: the exact flat index gives streaming scoring's top-k; approximate kinds find most of it."""

from __future__ import annotations

import pytest
import torch

from fastinfluence import score
from fastinfluence.features import Features, LayerSlice

faiss = pytest.importorskip("faiss")
from fastinfluence.index import build_index  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _features(n, seed, ids_from=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, 24, generator=g) * torch.rand(n, 1, generator=g).add(0.2)  # varied norms: dot != cosine
    layout = {"a": LayerSlice(0, 16, (4, 4)), "b": LayerSlice(16, 24, (2, 4))}
    return Features(data, data.norm(dim=1), list(range(ids_from, ids_from + n)), layout, None, {})


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("precondition", [None, "diagonal"])
def test_flat_index_equals_streaming_topk(metric, precondition):
    train, query = _features(3001, 0), _features(7, 1, ids_from=10_000)
    ref = score(query, train, metric=metric, precondition=precondition, topk=10)
    got = score(query, train, metric=metric, precondition=precondition, topk=10, index=build_index(train, metric))
    assert torch.equal(got.topk_indices, ref.topk_indices)
    assert torch.allclose(got.topk_values, ref.topk_values, rtol=1e-5, atol=1e-6)  # float32 both sides
    assert got.topk_ids == ref.topk_ids and got.precondition == ref.precondition and got.aggregates == {}


def test_ivf_finds_the_exact_topk_when_probing_every_cell():
    train, query = _features(4000, 2), _features(5, 3)
    idx = build_index(train, "cosine", kind="ivf", nlist=16)
    idx.nprobe = 16
    ref = score(query, train, metric="cosine", topk=10)
    assert torch.equal(score(query, train, metric="cosine", topk=10, index=idx).topk_indices, ref.topk_indices)


def test_ivfpq_recall_and_mismatch_errors():
    train, query = _features(4000, 4), _features(20, 5)
    idx = build_index(train, "dot", kind="ivfpq", nlist=8, m=12, nbits=4, nprobe=8)
    ref = score(query, train, topk=10).topk_indices
    got = score(query, train, topk=10, index=idx).topk_indices
    recall = sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), ref.tolist())) / ref.numel()
    assert recall > 0.5  # 6-byte codes of 24 floats: coarse, far above chance (10 / 4000)
    refined = build_index(train, "dot", kind="ivfpq", nlist=8, m=12, nbits=4, nprobe=8, refine=20)
    got = score(query, train, topk=10, index=refined)
    refined_recall = sum(len(set(a) & set(b)) for a, b in zip(got.topk_indices.tolist(), ref.tolist())) / ref.numel()
    assert refined_recall > max(recall, 0.9)  # 200 candidates re-ranked exactly
    exact = torch.einsum("qd,qkd->qk", query.data, train.data[got.topk_indices])
    assert torch.allclose(got.topk_values, exact, rtol=1e-5, atol=1e-5)  # re-ranked scores are the exact ones
    with pytest.raises(ValueError, match="metric='dot'"):
        score(query, train, metric="cosine", index=idx)
    with pytest.raises(ValueError, match="4000 rows"):
        score(query, _features(10, 6), index=idx)
    with pytest.raises(ValueError, match="m dividing"):
        build_index(train, kind="ivfpq", m=5)


def test_too_few_rows_for_the_cells_and_aggregates_with_an_index_are_named():
    small = _features(60, 7)
    with pytest.raises(ValueError, match=r"ivf fits nlist=1024 on 60 rows.*lower nlist.*kind='flat'"):
        build_index(small, "cosine", kind="ivf", nlist=1024, nprobe=16)
    with pytest.raises(ValueError, match=r"2\*\*nbits=256 PQ centroids \(nbits=8\) on 60 rows"):
        build_index(small, "cosine", kind="ivfpq", m=12)
    assert len(build_index(small, "cosine", kind="ivfpq", m=12, nbits=4, nlist=2)) == 60  # 16 centroids fit
    train, query = _features(300, 8), _features(3, 9)
    idx = build_index(train, "dot")
    with pytest.raises(ValueError, match=r"aggregates \('mean',\) need a streaming pass"):
        score(query, train, index=idx, aggregates=("mean",))
    assert score(query, train, index=idx, aggregates=()).aggregates == {}
    assert set(score(query, train).aggregates) == {"mean", "max", "sumsq"}  # the streaming default is unchanged
