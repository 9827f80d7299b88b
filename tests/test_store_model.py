"""FeatureStore with the real GradientExtractor on a tiny Llama: same features as in memory, foreign stores refused."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from fastinfluence import GradientExtractor, ProjectionConfig
from fastinfluence.scoring import score, token_scores
from fastinfluence.store import FeatureStore, MismatchError


def tiny_llama(seed):
    return tiny_model("llama", seed=seed, layers=1)


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (3, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "s"
    ext = GradientExtractor(tiny_llama(0), ProjectionConfig(rank_in=8, rank_out=8))
    store = ext.extract(batches(4), tokens=True, covariances=True, store=path, shard_rows=5)
    return ext, store, ext.extract(batches(4), tokens=True, covariances=True)


def test_store_of_a_real_model_equals_in_memory_extraction(extracted):
    _, store, mem = extracted
    got = store.to_features()
    assert got.ids == mem.ids == list(range(12))
    assert torch.equal(got.data, mem.data) and torch.equal(got.norms, mem.norms)
    a, g = store.token_factors(4)
    o = mem.tokens.offsets
    for n in mem.layout:
        assert torch.equal(a[n], mem.tokens.a[n][o[4] : o[5]]) and torch.equal(g[n], mem.tokens.g[n][o[4] : o[5]])


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda: GradientExtractor(tiny_llama(1), ProjectionConfig(rank_in=8, rank_out=8)), "model"),
        (
            lambda: GradientExtractor(tiny_llama(0), ProjectionConfig(rank_in=8, rank_out=8, exclude=["mlp"])),
            "layer set",
        ),
        (
            lambda: GradientExtractor(tiny_llama(0), ProjectionConfig(rank_in=8, rank_out=8, seed=1)),
            "projection config",
        ),
    ],
)
def test_store_is_refused_for_another_model_layer_set_or_config(extracted, make, named):
    _, store, _ = extracted
    with pytest.raises(MismatchError, match=named):
        FeatureStore.open(store.path, expect=make().metadata())


def test_token_scores_of_a_real_model_sum_to_its_scores(extracted):
    ext, store, _ = extracted
    query = ext.extract(batches(1, seed=5))
    res = score(query, store, topk=12, aggregates=())
    for row, s in zip((0, 7), token_scores(query, store, [0, 7])):
        full = torch.stack([res.topk_values[q][res.topk_indices[q] == row] for q in range(len(query))]).squeeze(1)
        assert float((s.sum(1) - full).norm() / full.norm()) < 1e-4  # float32 factors and features
