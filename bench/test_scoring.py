"""Scoring in memory and the chunked linear cross-entropy against materialised logits."""

from __future__ import annotations

import pytest
import torch

import fastinfluence as fi
from fastinfluence.features import Features, LayerSlice

Q, N, D = 64, 16384, 1024


def _features(n: int, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, D, generator=g)
    cfg = fi.ProjectionConfig(rank_in=32, rank_out=32)
    return Features(
        data=data,
        norms=data.norm(dim=1),
        ids=list(range(n)),
        layout={"l": LayerSlice(0, D, (32, 32))},
        config=cfg,
        fingerprint={"model": "bench", "layers": [], "weights_sha256": ""},
    )


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_score_in_memory(timed, metric):
    q, t = _features(Q, 0), _features(N, 1)
    res = timed(
        lambda: fi.score(q, t, metric=metric, topk=10),
        group="scoring",
        case="score",
        metric=metric,
        shape=f"{Q} x {N} x {D}",
        flops=2 * Q * N * D,
    )
    assert res.topk_indices.shape == (Q, 10)


@pytest.mark.parametrize("provider", ["chunked", "materialised"])
def test_linear_cross_entropy(timed, provider):
    g = torch.Generator().manual_seed(2)
    n, h, v = 1024, 256, 8192
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)

    def run():
        if provider == "chunked":
            loss = fi.ops.linear_cross_entropy(hidden, weight, labels, reduction="sum")
        else:
            loss = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, hidden)
        return grad

    grad = timed(run, group="linear_cross_entropy", case=provider, shape=f"{n} x {h} x {v}", flops=6 * n * h * v)
    assert grad.shape == hidden.shape
