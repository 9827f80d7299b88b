"""Scoring on a GPU equals scoring on the CPU (runs only where CUDA is available)."""
from __future__ import annotations

import pytest
import torch

from fastinfluence.scoring import score
from fastinfluence.store import write_store
from test_store_support import TokenTableExtractor, make_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_gpu_scores_equal_cpu_scores(tmp_path, dtype, metric):
    ext = TokenTableExtractor(dtype=dtype)
    store = write_store(tmp_path / "s", ext, make_batches(30, with_ids=True), shard_rows=16)
    query = ext.extract(make_batches(2, seed=4))
    cpu = score(query, store, metric=metric, topk=9, chunk_rows=7, device="cpu", per_layer=True)
    gpu = score(query, store, metric=metric, topk=9, chunk_rows=7, device="cuda", per_layer=True)
    assert torch.equal(gpu.topk_indices, cpu.topk_indices)
    tol = 1e-5  # float32 accumulation on both; summation order differs between devices
    assert float((gpu.topk_values - cpu.topk_values).norm() / cpu.topk_values.norm()) < tol
    for k in cpu.aggregates:
        assert float((gpu.aggregates[k] - cpu.aggregates[k]).norm() / cpu.aggregates[k].norm()) < tol
