"""`fastinfluence bench`: every backend that implements an op is timed, checked against torch and
reported with the backend that actually ran.

Tiny shapes (still at the Triton kernels' minimum tile sizes), so that the interpreted
Triton kernels take seconds, not minutes."""

import pytest

from fastinfluence import ops
from fastinfluence.cli import bench as bench_cli
from fastinfluence.ops._backend import implements

TINY = dict(B=2, T=16, d_in=32, d_out=48, k=16, Q=4, N=96, D=64, topk=5, jlB=2, jlD=1024, jlk=32, lN=32, lH=32, lV=256)


def test_bench_rows_cover_implementing_backends_and_agree_with_torch(monkeypatch):
    monkeypatch.setitem(bench_cli.SIZES, "tiny", TINY)
    before = ops.get_backend()
    rows = bench_cli.run("tiny", repeats=1, device="cpu")
    assert ops.get_backend() == before
    dispatched = bench_cli.case_ops("tiny", "cpu")
    for op in bench_cli.OPS:
        expected = [b for b in ops.available_backends("cpu") if any(implements(b, d, "cpu") for d in dispatched[op])]
        got = [r["backend"] for r in rows if r["op"] == op]
        assert got == expected and "torch" in got
    for r in rows:
        assert r["median_s"] > 0 and r["gflops"] > 0
        # float32 accumulation throughout; bfloat16 factors: each projected token rounded once at most
        assert r["rel_err_vs_torch"] <= (1e-2 if r["op"] == "project_bf16" else 1e-5), r
        if (r["op"], r["backend"]) == ("project", "cpu"):  # the host project covers bfloat16 inputs only
            assert r["ran"] == "torch" and "bfloat16" in r["fallback"], r
        else:
            assert r["ran"] == r["backend"] and r["fallback"] is None, r  # every other kernel covers its inputs
    if "cpu" in ops.available_backends("cpu"):
        assert any(r["ran"] == "cpu" for r in rows if r["op"] == "project_bf16")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ops_filter=["foo"]), "unknown ops foo for --ops; choose from project"),
        (dict(repeats=0), "--repeats must be >= 1"),
        (dict(device="tpu"), "give cpu or cuda"),
    ],
)
def test_bench_refuses_what_would_print_an_empty_table(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_cli.run("small", **kwargs)
