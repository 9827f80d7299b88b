"""score / self_influence / token_scores against the dense float64 formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import rel_err
from test_store_support import TokenTableExtractor, make_batches

from fastinfluence.features import Features
from fastinfluence.scoring import score, self_influence, token_scores
from fastinfluence.store import MismatchError, write_store


def dense_scores(q, x, layout, metric="dot", layer_normalize=False):
    """(Q, N) float64 reference."""
    q, x = q.double(), x.double()
    if layer_normalize:

        def norm_layers(m):
            m = m.clone()
            for sl in layout.values():
                blk = m[:, sl.start : sl.stop]
                n = blk.norm(dim=1, keepdim=True)
                m[:, sl.start : sl.stop] = torch.where(n > 0, blk / n, 0.0)
            return m

        q, x = norm_layers(q), norm_layers(x)
    S = q @ x.T
    if metric == "cosine":
        S = S / q.norm(dim=1)[:, None] / x.norm(dim=1)[None, :]
    return S


def dense_topk(S, k):
    order = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :k]
    return S.gather(1, order), order


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
    ext = TokenTableExtractor()
    path = tmp_path_factory.mktemp("train") / "s"
    return write_store(path, ext, make_batches(23, with_ids=True), tokens=True, covariances=True, shard_rows=10)


@pytest.fixture(scope="module")
def query():
    return TokenTableExtractor().extract(make_batches(2, batch_size=3, seed=9), tokens=True)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("layer_normalize", [False, True])
def test_streaming_over_many_shards_and_chunks_equals_dense_matrix(train_store, query, metric, layer_normalize):
    assert len(train_store.shards) >= 6
    mem = train_store.to_features()
    res = score(
        query,
        train_store,
        metric=metric,
        topk=7,
        layer_normalize=layer_normalize,
        chunk_rows=4,
        aggregates=("mean", "max", "sum", "sumsq"),
    )
    S = dense_scores(query.data, mem.data, mem.layout, metric, layer_normalize)
    vals, idx = dense_topk(S, 7)
    assert torch.equal(res.topk_indices, idx)
    assert rel_err(res.topk_values, vals) < 1e-5  # float32 accumulation of O(10)-term dots
    assert res.topk_ids == [[mem.ids[i] for i in row] for row in idx.tolist()]
    for name, ref in [("mean", S.mean(0)), ("max", S.amax(0)), ("sum", S.sum(0)), ("sumsq", (S * S).sum(0))]:
        assert rel_err(res.aggregates[name], ref) < 1e-5, name


def test_store_and_in_memory_features_give_identical_results(train_store, query):
    a = score(query, train_store, metric="cosine", topk=5, chunk_rows=3)
    b = score(query, train_store.to_features(), metric="cosine", topk=5, chunk_rows=1000)
    assert torch.equal(a.topk_indices, b.topk_indices)
    assert torch.allclose(a.topk_values, b.topk_values, rtol=1e-6)
    assert torch.allclose(a.aggregates["max"], b.aggregates["max"], rtol=1e-6)


def test_full_matrix_is_written_to_a_memory_mapped_file(train_store, query, tmp_path):
    res = score(query, train_store, metric="cosine", topk=3, chunk_rows=5, matrix_path=tmp_path / "S.npy")
    S = dense_scores(query.data, train_store.to_features().data, train_store.layout, "cosine")
    assert isinstance(res.matrix, np.memmap) and res.matrix.shape == (len(query), len(train_store))
    assert rel_err(torch.from_numpy(np.load(tmp_path / "S.npy")), S) < 1e-5


def test_per_layer_scores_sum_to_the_topk_scores_and_match_each_layer(train_store, query):
    res = score(query, train_store, metric="cosine", topk=4, per_layer=True)
    mem = train_store.to_features()
    total = sum(res.layer_scores.values())
    assert rel_err(total, res.topk_values) < 1e-5
    for name, sl in mem.layout.items():
        x = mem.data[res.topk_indices][..., sl.start : sl.stop].double()
        ref = torch.einsum("qd,qkd->qk", query.data[:, sl.start : sl.stop].double(), x)
        ref = ref / query.data.double().norm(dim=1)[:, None] / mem.data.double().norm(dim=1)[res.topk_indices]
        assert rel_err(res.layer_scores[name], ref) < 1e-5


def test_topk_larger_than_the_train_set_returns_every_row(query):
    gen = torch.Generator().manual_seed(3)
    train = Features(
        torch.randn(5, query.dim, generator=gen), None, list("abcde"), query.layout, query.config, query.fingerprint
    )
    train.norms = train.data.norm(dim=1)
    res = score(query, train, topk=50)
    assert res.topk_indices.shape == (len(query), 5)
    assert sorted(res.topk_indices[0].tolist()) == list(range(5))


def test_query_from_another_model_is_refused_naming_the_difference(train_store):
    other = TokenTableExtractor(vocab=41).extract(make_batches(1))
    with pytest.raises(MismatchError, match="different model: fingerprint\\['vocab'\\]"):
        score(other, train_store)


def test_bad_arguments_are_rejected_early(train_store, query):
    with pytest.raises(ValueError, match="metric"):
        score(query, train_store, metric="l2")
    with pytest.raises(ValueError, match="aggregates"):
        score(query, train_store, aggregates=("median",))
    with pytest.raises(ValueError, match="precondition"):
        score(query, train_store, precondition="shampoo")


def test_self_influence_is_the_squared_norm_of_each_row(train_store):
    x = train_store.to_features().data.double()
    assert rel_err(self_influence(train_store, chunk_rows=4), (x * x).sum(1)) < 1e-6


@pytest.mark.parametrize(
    "metric, layer_normalize, precondition",
    [("dot", False, None), ("cosine", False, None), ("dot", True, None), ("dot", False, "kfac")],
)
def test_token_scores_sum_to_the_example_score(train_store, query, metric, layer_normalize, precondition):
    rows = [0, 17, 68]
    res = score(
        query,
        train_store,
        metric=metric,
        layer_normalize=layer_normalize,
        precondition=precondition,
        topk=len(train_store),
        aggregates=(),
    )
    ts = token_scores(
        query, train_store, rows, metric=metric, layer_normalize=layer_normalize, precondition=precondition
    )
    col = torch.argsort(res.topk_indices, dim=1)
    full = res.topk_values.gather(1, col)
    for r, s in zip(rows, ts):
        a, _ = train_store.token_factors(r)
        assert s.shape == (len(query), next(iter(a.values())).shape[0])
        assert rel_err(s.sum(1), full[:, r]) < 1e-5


def test_token_scores_from_in_memory_features_equal_those_from_the_store(train_store, query):
    mem = TokenTableExtractor().extract(make_batches(23, with_ids=True), tokens=True)
    for a, b in zip(token_scores(query, mem, [5, 40]), token_scores(query, train_store, [5, 40])):
        assert torch.equal(a, b)


def test_topk_none_ranks_every_train_row():
    from fastinfluence import score
    from fastinfluence.config import ProjectionConfig
    from fastinfluence.features import Features, LayerSlice

    g = torch.Generator().manual_seed(4)
    layout = {"l": LayerSlice(0, 12, (3, 4))}

    def feats(n):
        data = torch.randn(n, 12, generator=g)
        return Features(data, data.norm(dim=1), list(range(n)), layout, ProjectionConfig(), {"m": 1})

    q, t = feats(3), feats(9)
    res = score(q, t, metric="dot", topk=None)
    full = q.data @ t.data.T
    assert res.topk_indices.shape == (3, 9)
    assert torch.equal(res.topk_indices, torch.sort(full, dim=1, descending=True, stable=True).indices)


def test_query_stays_as_is_on_the_cpu():
    from fastinfluence.scoring import _half_query

    q, qs = torch.tensor([[3e5, -4e5]]), torch.tensor([2.0])
    out, scale = _half_query(q, qs, torch.randn(5, 2).half())
    assert out is q and scale is qs


@pytest.mark.gpu
def test_half_precision_query_is_cast_at_unit_norm():
    """A preconditioned query far beyond float16's range is scored through its unit-norm rows
    and a float32 scale (the GPU path for float16 stores)."""
    from fastinfluence.scoring import _half_query

    q = torch.tensor([[3e5, -4e5], [1e-3, 2e-3]], device="cuda")
    qh, scale = _half_query(q, None, torch.randn(5, 2, device="cuda").half())
    assert torch.isfinite(qh).all() and qh.dtype == torch.float16
    assert torch.allclose(qh.float() * scale[:, None], q, rtol=1e-3)
