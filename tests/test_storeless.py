"""score_batches: one pass over train batches, nothing written, equal to score() on a store."""

import pytest
import torch
from helpers import batches_of, make_examples, tiny_model

import fastinfluence as fi
from fastinfluence.storeless import score_batches


@pytest.mark.parametrize("metric,layer_normalize", [("dot", False), ("cosine", True)])
def test_equals_score_on_a_store(tmp_path, metric, layer_normalize):
    model = tiny_model("llama")
    ex = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=8, rank_out=8))
    train_batches = batches_of(make_examples(11, seed=1), 3)
    query = ex.extract(batches_of(make_examples(4, seed=2), 2))
    store = ex.extract(train_batches, store=str(tmp_path / "train"))
    ref = fi.score(query, store, metric=metric, layer_normalize=layer_normalize, topk=5, aggregates=("mean", "max"))
    out = score_batches(
        ex, query, train_batches, metric=metric, layer_normalize=layer_normalize, topk=5, aggregates=("mean", "max")
    )
    assert torch.equal(out.topk_indices, ref.topk_indices) and out.topk_ids == ref.topk_ids
    assert torch.allclose(out.topk_values, ref.topk_values, rtol=1e-6, atol=1e-7)
    for k in ("mean", "max"):
        assert torch.allclose(out.aggregates[k], ref.aggregates[k], rtol=1e-6, atol=1e-7)
    assert out.train_ids == ref.train_ids


def test_topk_larger_than_the_train_set_and_bad_input():
    model = tiny_model("llama")
    ex = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=4, rank_out=4))
    train = batches_of(make_examples(3, seed=1), 2)
    query = ex.extract(batches_of(make_examples(2, seed=2), 2))
    out = score_batches(ex, query, train, topk=10)
    assert out.topk_indices.shape == (2, 3)
    assert sorted(out.topk_indices[0].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="fitted Preconditioner"):
        score_batches(ex, query, train, precondition="kfac")
    other = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=4, rank_out=4, seed=1))
    with pytest.raises(ValueError):
        score_batches(other, query, train)
