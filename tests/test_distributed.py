"""A 2-process gloo run (torchrun) gives the same store and the same scores as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from test_store_support import TokenTableExtractor, make_batches

from fastinfluence.scoring import score
from fastinfluence.store import FeatureStore, write_store

HERE = Path(__file__).parent

_WORKER = """
import sys, torch
from fastinfluence import distributed as dist
from fastinfluence.scoring import score
from fastinfluence.store import write_store
from test_store_support import TokenTableExtractor, make_batches

assert dist.init_from_env() and dist.rank_world()[1] == 2
try:
    ext = TokenTableExtractor()
    store = write_store(sys.argv[1], ext, make_batches(10, with_ids=True), tokens=True, covariances=True, shard_rows=4)
    query = ext.extract(make_batches(1, batch_size=5, seed=3))
    aggregates = ("mean", "max", "sumsq")
    matrix = sys.argv[2] + ".npy"
    res = score(query, store, metric="cosine", topk=6, chunk_rows=5, aggregates=aggregates, matrix_path=matrix)
    if dist.rank_world()[0] == 0:
        out = {"values": res.topk_values, "indices": res.topk_indices, "ids": res.topk_ids, "agg": res.aggregates}
        torch.save(out, sys.argv[2])
    dist.barrier()  # no rank tears its communicator down while another still uses it
finally:
    torch.distributed.destroy_process_group()
"""


def test_two_gloo_processes_give_the_same_store_and_topk_as_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path / "two"),
        str(tmp_path / "res.pt"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ext = TokenTableExtractor()
    one = write_store(
        tmp_path / "one", ext, make_batches(10, with_ids=True), tokens=True, covariances=True, shard_rows=4
    )
    two = FeatureStore.open(tmp_path / "two")
    two.verify()
    assert [s["first"] for s in two.shards] == [0, 6, 12, 15, 21, 27]  # rank 1 started at example 15
    a, b = one.to_features(), two.to_features()
    assert b.ids == a.ids and torch.equal(b.data, a.data) and torch.equal(b.norms, a.norms)
    for n, (A, G, c) in one.stats.items():
        torch.testing.assert_close(two.stats[n][0], A, rtol=1e-12, atol=0)
        torch.testing.assert_close(two.stats[n][1], G, rtol=1e-12, atol=0)
        assert two.stats[n][2] == c
    for row in (0, 29):
        assert all(
            torch.equal(x, y) for x, y in zip(one.token_factors(row)[0].values(), two.token_factors(row)[0].values())
        )

    query = ext.extract(make_batches(1, batch_size=5, seed=3))
    ref = score(
        query,
        one,
        metric="cosine",
        topk=6,
        chunk_rows=5,
        aggregates=("mean", "max", "sumsq"),
        matrix_path=tmp_path / "one.npy",
    )
    got = torch.load(tmp_path / "res.pt")
    assert torch.equal(got["indices"], ref.topk_indices)
    assert got["ids"] == ref.topk_ids
    # the ranks' chunks have other shapes than one process's, so float32 sums may differ in the last bit
    torch.testing.assert_close(got["values"], ref.topk_values, rtol=1e-6, atol=1e-7)
    for k, v in ref.aggregates.items():
        torch.testing.assert_close(got["agg"][k], v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        torch.from_numpy(np.load(tmp_path / "res.pt.npy")),
        torch.from_numpy(np.load(tmp_path / "one.npy")),
        rtol=1e-6,
        atol=1e-7,
    )
