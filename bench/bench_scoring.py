"""Streaming-scoring throughput and peak memory for growing feature stores.

For each store size N (rows of D features in float16) a store is written to a temporary
directory through ``write_store`` (random features, shards of ``--shard-rows`` rows), then
a fresh process scores Q queries against it (``score``: top-k, mean/max/sumsq aggregates,
checksums verified while reading) and reports wall time, train rows per second and its
peak resident memory. Flat memory across N is the point: the train side is streamed.

    python bench/bench_scoring.py                       # 10k, 100k, 500k rows of D=4096
    python bench/bench_scoring.py --rows 10000 --dim 1024 --out scoring.json

Needs about N * D * 2 bytes of free disk in --tmp (4.1 GB for 500k x 4096); the store is
deleted afterwards. Results go to bench/results/scoring_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastinfluence.config import ProjectionConfig
from fastinfluence.features import Features, LayerSlice


class RandomExtractor:
    """Extractor interface over random features: batch b holds rows drawn from seed b."""

    def __init__(self, dim: int, layers: int = 4):
        per = dim // layers
        self.layout = {f"layer{i}": LayerSlice(i * per, (i + 1) * per, (per // 64, 64)) for i in range(layers)}
        self.config = ProjectionConfig(rank_in=64, rank_out=per // 64, dtype="float16")
        self.dim = dim

    def metadata(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "fingerprint": {"model": "random"},
            "layout": self.layout,
            "dtype": "float16",
        }

    def iter_features(self, batches, skip_examples=0, tokens=False, covariances=False):
        for b in batches:
            n = len(b["input_ids"])
            if skip_examples >= n:
                skip_examples -= n
                continue
            x = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(int(b["ids"][0])))
            yield Features(x.half(), x.norm(dim=1), list(b["ids"]), self.layout, self.config, {"model": "random"})


def build_store(path: Path, rows: int, dim: int, shard_rows: int, batch: int = 4096) -> float:
    from fastinfluence.store import write_store

    batches = [
        {"input_ids": torch.zeros(min(batch, rows - s), 1), "ids": list(range(s, min(s + batch, rows)))}
        for s in range(0, rows, batch)
    ]
    t = time.perf_counter()
    write_store(path, RandomExtractor(dim), batches, shard_rows=shard_rows)
    return time.perf_counter() - t


def _memory_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(store_path: str, queries: int, topk: int, chunk_rows: int) -> None:
    """Score in this process and print one JSON line (run in a fresh process per store)."""
    from fastinfluence.scoring import score
    from fastinfluence.store import FeatureStore

    store = FeatureStore.open(store_path)
    q = store.rows(range(queries)).float() + 0.1 * torch.randn(queries, store.dim)
    query = Features(q.half(), q.norm(dim=1), list(range(queries)), store.layout, store.config, store.fingerprint)
    base = _memory_mb("VmRSS")
    t = time.perf_counter()
    res = score(query, store, metric="cosine", topk=topk, chunk_rows=chunk_rows)
    seconds = time.perf_counter() - t
    assert torch.equal(res.topk_indices[:, 0], torch.arange(queries)), "each query's source row must rank first"
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rows_per_s": store.num_rows / seconds,
                "peak_rss_mb": _memory_mb("VmHWM"),
                "rss_before_scoring_mb": base,
                "gb_read_per_s": store.num_rows * store.dim * 2 / seconds / 1e9,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 500_000], help="store sizes (rows)")
    ap.add_argument("--dim", type=int, default=4096, help="features per row (D)")
    ap.add_argument("--queries", type=int, default=16, help="queries scored (Q)")
    ap.add_argument("--topk", type=int, default=10, help="top-k per query")
    ap.add_argument("--chunk-rows", type=int, default=8192, help="train rows per chunk")
    ap.add_argument("--shard-rows", type=int, default=16384, help="rows per shard file")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary stores go")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring_cpu.json"), help="results JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.queries, args.topk, args.chunk_rows)

    need = max(args.rows) * args.dim * 2
    free = shutil.disk_usage(args.tmp).free
    if free < 1.2 * need:
        sys.exit(
            f"{args.tmp} has {free / 1e9:.1f} GB free; the largest store needs {need / 1e9:.1f} GB: pass fewer "
            f"--rows or another --tmp"
        )
    results, load_before = [], os.getloadavg()
    for rows in args.rows:
        path = Path(tempfile.mkdtemp(dir=args.tmp)) / "store"
        try:
            write_s = build_store(path, rows, args.dim, args.shard_rows)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(path),
                "--queries",
                str(args.queries),
                "--topk",
                str(args.topk),
                "--chunk-rows",
                str(args.chunk_rows),
            ]
            out = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        entry = {
            "rows": rows,
            "dim": args.dim,
            "dtype": "float16",
            "store_gb": rows * args.dim * 2 / 1e9,
            "write_s": write_s,
            **out,
        }
        print(json.dumps(entry), flush=True)
        results.append(entry)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "queries": args.queries,
        "topk": args.topk,
        "chunk_rows": args.chunk_rows,
        "shard_rows": args.shard_rows,
        "metric": "cosine",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "store files read from the page cache (written just before); checksums verified while reading; "
        "peak_rss_mb is the scoring process's VmHWM, rss_before_scoring_mb its VmRSS after imports and opening the "
        "store",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
