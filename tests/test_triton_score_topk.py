"""Triton score_topk against the float64 torch reference, streamed over train chunks."""

import pytest
import torch
from helpers import rel_err
from test_triton_support import DEVICES, DTYPES, TOL, on_backend, randn

from fastinfluence.ops.score_topk import score_topk_reference
from fastinfluence.triton_kernels import score_topk


def _stream(fn, query, chunks, k, cosine, dtype=None):
    """Feed ``chunks`` in index order; returns the final top-k and every chunk's aggregates."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    q_scale = 1 / query.double().norm(dim=1) if cosine else None
    top, aggregates, offset = None, [], 0
    for x in chunks:
        x_scale = 1 / x.double().norm(dim=1) if cosine else None
        top, agg = fn(
            cast(query),
            cast(x),
            k,
            q_scale.to(torch.float32) if cosine else None,
            x_scale.to(torch.float32) if cosine else None,
            offset,
            top,
        )
        aggregates.append(agg)
        offset += x.shape[0]
    return top, torch.cat(aggregates, dim=1)


def _check_topk(top, ref_top, scores, tol, offset=0):
    """Values match the reference's; each returned index (rows from ``offset``) scores its value.

    (Rounding may swap near-equal scores, so indices are checked through their scores.)
    """
    assert top.values.shape == ref_top.values.shape and top.indices.dtype == torch.int64
    assert rel_err(top.values, ref_top.values) <= tol
    assert rel_err(top.values, scores.gather(1, top.indices.cpu() - offset)) <= tol
    assert bool((top.indices.sort(dim=1).values.diff(dim=1) > 0).all())  # no row twice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cosine", [False, True])
def test_streamed_chunks_match_reference(device, dtype, cosine, poisoned):
    # k = 20 is larger than the first chunk; chunk sizes are not multiples of the block.
    g = torch.Generator().manual_seed(int(cosine))
    query = randn(5, 37, dtype=dtype, device=device, generator=g)
    chunks = [randn(n, 37, dtype=dtype, device=device, generator=g) for n in (13, 29, 3)]
    top, agg = _stream(score_topk, query, chunks, 20, cosine)
    train = torch.cat(chunks).cpu().double()
    ref_top, ref_agg = _stream(score_topk_reference, query.cpu(), [train], 20, cosine, torch.float64)
    scores = query.cpu().double() @ train.T
    if cosine:
        scores = scores / query.cpu().double().norm(dim=1, keepdim=True) / train.norm(dim=1)
    _check_topk(top, ref_top, scores, TOL[device, dtype])
    assert agg.shape == (3, 45) and agg.dtype == torch.float32
    for row in range(3):  # sum, sum of squares, max over the queries
        assert rel_err(agg[row], ref_agg[row]) <= TOL[device, dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_train_index_across_chunks(device, poisoned):
    # Small integers: every score is exact in every precision, and many are equal.
    g = torch.Generator().manual_seed(7)
    query = torch.randint(-2, 3, (4, 20), generator=g).to(torch.bfloat16).to(device)
    chunks = [torch.randint(-1, 2, (n, 20), generator=g).to(torch.bfloat16).to(device) for n in (17, 40)]
    top, agg = _stream(score_topk, query, chunks, 30, cosine=False)
    ref_top, ref_agg = _stream(score_topk_reference, query.cpu(), [c.cpu() for c in chunks], 30, False, torch.float32)
    assert torch.equal(top.indices.cpu(), ref_top.indices)
    assert torch.equal(top.values.cpu(), ref_top.values)
    assert torch.equal(agg.cpu(), ref_agg)


@pytest.mark.parametrize("device", DEVICES)
def test_k_of_128_larger_than_all_rows_returns_every_row_sorted(device, poisoned):
    g = torch.Generator().manual_seed(8)
    query = randn(3, 24, device=device, generator=g)
    train = randn(50, 24, device=device, generator=g)
    top, _ = score_topk(query, train, 128, index_offset=1000)
    ref_top, _ = score_topk_reference(query.cpu().double(), train.cpu().double(), 128, index_offset=1000)
    assert top.values.shape == (3, 50)
    assert torch.equal(top.indices.sort(dim=1).values.cpu(), torch.arange(1000, 1050).expand(3, -1))
    assert rel_err(top.values, ref_top.values) <= TOL[device, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("Q", [16, 1024])
def test_store_sized_chunk_on_gpu(Q, poisoned):
    g = torch.Generator().manual_seed(Q)
    query = randn(Q, 4096, dtype=torch.bfloat16, device="cuda", generator=g)
    train = randn(5000, 4096, dtype=torch.bfloat16, device="cuda", generator=g)
    top, agg = score_topk(query, train, 100, index_offset=7)
    ref_top, ref_agg = score_topk_reference(query.double(), train.double(), 100, index_offset=7)
    scores = (query.double() @ train.double().T).cpu()
    _check_topk(top, ref_top, scores, TOL["cuda", torch.bfloat16], offset=7)
    for row in range(3):
        assert rel_err(agg[row], ref_agg[row]) <= TOL["cuda", torch.bfloat16]


def test_mixed_dtypes_run_on_the_reference():
    query, train = torch.randn(3, 8, dtype=torch.float64), torch.randn(9, 8)
    from fastinfluence import ops

    (top, agg), ran = on_backend("triton", ops.score_topk, query, train, 4)
    ref_top, ref_agg = score_topk_reference(query, train, 4)
    assert ran == ["torch"]
    assert torch.equal(top.indices, ref_top.indices) and torch.equal(agg, ref_agg)
