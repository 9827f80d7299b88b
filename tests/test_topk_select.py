"""k-selection of score_topk on the host twin: exactly the reference's values, indices and order."""

from __future__ import annotations

import pytest
import torch

from fastinfluence.ops.score_topk import TopK, score_topk_reference

cpu = pytest.importorskip("fastinfluence.ops.backends.cpu")
pytestmark = pytest.mark.skipif(cpu._ext is None, reason="the C++ host kernels are not built")


def assert_same(fast, ref):
    (top, agg), (top_ref, agg_ref) = fast, ref
    assert top.values.dtype == top_ref.values.dtype and top.indices.dtype == torch.int64
    assert torch.equal(top.indices, top_ref.indices)
    torch.testing.assert_close(top.values, top_ref.values, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(agg, agg_ref, rtol=0, atol=0, equal_nan=True)


def both(*args, **kwargs):
    return cpu.score_topk(*args, **kwargs), score_topk_reference(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 130])
def test_one_chunk_matches_reference(dtype, k):
    torch.manual_seed(k)
    q, x = torch.randn(5, 24).to(dtype), torch.randn(301, 24).to(dtype)
    assert_same(*both(q, x, k, index_offset=1000))


def test_scales_match_reference():
    torch.manual_seed(1)
    q, x = torch.randn(3, 16), torch.randn(77, 16)
    assert_same(*both(q, x, 9, query_scale=1 / q.norm(dim=1), train_scale=1 / x.norm(dim=1)))


def test_ties_keep_the_lower_index_first():
    torch.manual_seed(2)
    # Integer-valued scores: many exact ties inside a chunk and against prev.
    q, x = torch.randint(-2, 3, (4, 6)).float(), torch.randint(-2, 3, (150, 6)).float()
    first = both(q, x[:70], 25)
    assert_same(*first)
    assert_same(*both(q, x[70:], 25, index_offset=70, prev=first[1][0]))


def test_nan_scores_sort_first_as_in_torch():
    torch.manual_seed(3)
    q, x = torch.randn(2, 8), torch.randn(40, 8)
    x[[3, 17, 30]] = float("nan")
    assert_same(*both(q, x, 6))


def test_k_larger_than_rows_seen_returns_all_rows():
    torch.manual_seed(4)
    q, x = torch.randn(3, 8), torch.randn(11, 8)
    fast, ref = both(q, x, 50)
    assert fast[0].values.shape == (3, 11)
    assert_same(fast, ref)


def test_merging_chunks_equals_one_pass_over_all_rows():
    torch.manual_seed(5)
    q, x = torch.randn(6, 32), torch.randn(1000, 32)
    top = None
    for start in range(0, 1000, 333):
        top, _ = cpu.score_topk(q, x[start : start + 333], 40, index_offset=start, prev=top)
    whole, _ = score_topk_reference(q, x, 40)
    assert torch.equal(top.indices, whole.indices)
    torch.testing.assert_close(top.values, whole.values, rtol=1e-6, atol=1e-6)  # matmul blocking differs


def test_unsorted_prev_is_merged_like_the_reference():
    torch.manual_seed(6)
    q, x = torch.randn(2, 8), torch.randn(30, 8)
    prev = TopK(torch.randn(2, 5, dtype=torch.float64), torch.randint(100, 200, (2, 5)))
    assert_same(*both(q, x, 8, index_offset=300, prev=prev))


def test_prev_with_wrong_shape_is_rejected():
    q, x = torch.randn(2, 8), torch.randn(30, 8)
    prev = TopK(torch.randn(3, 5), torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="prev values"):
        cpu.score_topk(q, x, 4, prev=prev)
