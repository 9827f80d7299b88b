"""`fastinfluence bench`: every backend that implements an op is timed and checked against torch."""
from fastinfluence import bench_cli, ops
from fastinfluence.ops._backend import implements


def test_bench_rows_cover_implementing_backends_and_agree_with_torch():
    before = ops.get_backend()
    rows = bench_cli.run("small", repeats=1, device="cpu", ops_filter=["project", "score_topk", "jl_project"])
    assert ops.get_backend() == before
    for op in ("project", "score_topk", "jl_project"):
        expected = [b for b in ops.available_backends("cpu") if implements(b, op, "cpu")]
        got = [r["backend"] for r in rows if r["op"] == op]
        assert got == expected and "torch" in got
    for r in rows:
        assert r["median_s"] > 0 and r["gflops"] > 0
        assert r["rel_err_vs_torch"] <= 1e-5, r  # float32 inputs, float32 accumulation
