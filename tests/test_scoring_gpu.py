"""Scoring on a GPU equals scoring on the CPU (runs only where CUDA is available)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_store_support import TokenTableExtractor, make_batches

from fastinfluence.scoring import score
from fastinfluence.store import write_store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Relative error of GPU scores against the CPU's float32 ones. The Triton kernel multiplies
# float32 rows in TF32 (10-bit mantissa: ~5e-4 per product, measured up to 7.4e-4 on these
# sums); float16 rows run as float16 with float32 accumulation and the query is cast to
# float16 at unit norm (~1e-4 measured). Both bounds leave about 4x margin.
TOL = {"float32": 3e-3, "float16": 1e-3}


def assert_same_top_k(gpu, cpu, full: torch.Tensor, tol: float) -> None:
    """GPU top-k equals the CPU's up to ``tol``, indices compared through their CPU scores.

    Two train rows whose scores differ by less than the rounding of the GPU product may swap
    places, so an index is right when its CPU score is the score the GPU reports for it and
    lies within the tolerance of the CPU's k-th best. ``full`` is the CPU (Q, N) matrix.
    """
    assert gpu.topk_indices.shape == cpu.topk_indices.shape
    rel = float((gpu.topk_values - cpu.topk_values).norm() / cpu.topk_values.norm())
    assert rel < tol, f"top-k values differ by {rel:.2e} (bound {tol:g})"
    atol = tol * full.abs().amax(dim=1, keepdim=True)  # per query: the tolerance on its largest score
    picked = full.gather(1, gpu.topk_indices)
    assert bool(((picked - gpu.topk_values).abs() <= atol).all()), "a GPU index does not carry its reported score"
    assert bool((picked >= cpu.topk_values[:, -1:] - atol).all()), "a GPU index is outside the CPU's top k"
    for row in gpu.topk_indices:
        assert len(set(row.tolist())) == len(row), "a train row is listed twice"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_gpu_scores_equal_cpu_scores(tmp_path, dtype, metric):
    ext = TokenTableExtractor(dtype=dtype)
    store = write_store(tmp_path / "s", ext, make_batches(30, with_ids=True), shard_rows=16)
    query = ext.extract(make_batches(2, seed=4))
    cpu = score(
        query,
        store,
        metric=metric,
        topk=9,
        chunk_rows=7,
        device="cpu",
        per_layer=True,
        matrix_path=tmp_path / "cpu.npy",
    )
    gpu = score(query, store, metric=metric, topk=9, chunk_rows=7, device="cuda", per_layer=True)
    full = torch.from_numpy(np.array(cpu.matrix))
    tol = TOL[dtype]
    assert_same_top_k(gpu, cpu, full, tol)
    for k in cpu.aggregates:
        rel = float((gpu.aggregates[k] - cpu.aggregates[k]).norm() / cpu.aggregates[k].norm())
        assert rel < tol, f"aggregate {k} differs by {rel:.2e}"
    same = gpu.topk_indices == cpu.topk_indices  # layer shares are comparable where both picked the same row
    for name, shares in cpu.layer_scores.items():
        err = (gpu.layer_scores[name] - shares).abs()[same]
        assert bool((err <= tol * full.abs().max()).all()), f"layer {name}: shares differ by {float(err.max()):.2e}"
