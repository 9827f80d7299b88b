"""evaluate.lds, recall_at_k and spearman on hand-made inputs whose answers are worked out by hand."""

import math

import pytest
import torch

from fastinfluence.evaluate import lds, recall_at_k, spearman
from fastinfluence.scoring import ScoreResult


def test_spearman_hand_cases():
    # one swapped pair among 4: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 30, 20, 40])) == pytest.approx(0.8, abs=1e-15)
    # tie: ranks (1.5, 1.5, 3) vs (1, 2, 3): 1.5 / sqrt(1.5 * 2)
    tied = spearman(torch.tensor([5.0, 5, 7]), torch.tensor([1.0, 2, 3]))
    assert tied == pytest.approx(1.5 / math.sqrt(3), abs=1e-15)
    assert spearman(torch.tensor([3.0, 1, 2]), torch.tensor([-3.0, -1, -2])) == pytest.approx(-1.0, abs=1e-15)
    assert math.isnan(spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])))


def test_lds_hand_case():
    # 3 train rows, 2 queries. Query 0: row 2 helps most, row 0 hurts; query 1 reversed.
    scores = torch.tensor([[-1.0, 0.5, 2.0], [2.0, 0.5, -1.0]])
    subsets = [[0, 1], [1, 2], [0, 2], [2]]
    # predicted sums, query 0: -0.5, 2.5, 1.0, 2.0  -> lower loss where the sum is higher
    # query 1: 2.5, -0.5, 1.0, -1.0
    losses = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 1.5], [1.0, 5.0]])
    # query 0: -loss = (-3, 0, -2, -1) orders the subsets as the sums do -> 1
    # query 1: -loss = (0, -3, -1.5, -5): sums rank (4, 2, 3, 1), -loss ranks (4, 2, 3, 1) -> 1
    assert lds(scores, subsets, losses) == pytest.approx(1.0, abs=1e-15)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert lds(scores, mask, -losses) == pytest.approx(-1.0, abs=1e-15)
    # swapping the losses of the last two subsets for query 0 only: ranks (1,4,2,3) vs (1,4,3,2) -> 0.8
    swapped = losses.clone()
    swapped[2, 0], swapped[3, 0] = losses[3, 0], losses[2, 0]
    per = lds(scores, subsets, swapped, per_query=True)
    assert per.tolist() == pytest.approx([0.8, 1.0], abs=1e-15)
    assert lds(scores, subsets, swapped) == pytest.approx(0.9, abs=1e-15)


def test_lds_skips_queries_with_constant_losses_and_checks_shapes():
    scores = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    losses = torch.tensor([[1.0, 7.0], [2.0, 7.0], [3.0, 7.0]])  # query 1's loss never moves
    subsets = [[0], [1], [0, 1]]  # query 0 sums 1, 2, 3 vs -loss -1, -2, -3 -> -1
    assert lds(scores, subsets, losses) == pytest.approx(-1.0, abs=1e-15)
    assert math.isnan(float(lds(scores, subsets, losses, per_query=True)[1]))
    with pytest.raises(ValueError, match=r"\(M, Q\)"):
        lds(scores, subsets, losses.T)
    with pytest.raises(ValueError, match="outside"):
        lds(scores, [[0], [2]], losses[:2])
    with pytest.raises(ValueError, match="undefined"):
        lds(scores, subsets, torch.ones(3, 2))


def test_recall_at_k_hand_case():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0], [0.0, 0.0, 1.0, 0.5]])
    # top-1 (ties to the lower row): 1, 0, 2; top-2: {1, 3}, {0, 1}, {2, 3}
    assert recall_at_k(scores, [1, 1, 2], k=1) == pytest.approx(2 / 3)
    assert recall_at_k(scores, [3, 1, 2], k=1) == pytest.approx(1 / 3)  # row 3 ties row 1 and loses
    assert recall_at_k(scores, [3, 1, 2], k=2) == pytest.approx(1.0)
    # several sources: query 0 {1, 2}: 1 of 2 in its top-2; query 1 {2, 3}: 0; query 2 {3}: 1
    assert recall_at_k(scores, [[1, 2], [2, 3], [3]], k=2) == pytest.approx((0.5 + 0 + 1) / 3)
    top = torch.sort(scores, dim=1, descending=True, stable=True)
    result = ScoreResult(top.values[:, :2], top.indices[:, :2], [], {}, [], [], "dot", "identity")
    assert recall_at_k(result, [[1, 2], [2, 3], [3]], k=2) == pytest.approx((0.5 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="topk >= 3"):
        recall_at_k(result, [1, 1, 2], k=3)
    with pytest.raises(ValueError, match="2 entries for 3 queries"):
        recall_at_k(scores, [1, 1], k=1)
