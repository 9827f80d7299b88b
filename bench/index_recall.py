"""Recall@10 and query time of FAISS indexes against exact streaming top-k at 1M rows.

Synthetic features with the structure of gradient features: rows = a cluster direction
(2048 clusters, each a random direction) times a log-normal norm, plus isotropic noise
(signal-to-noise 1:1 per row), stored in float16 like a real store. Queries are noisy copies of
random train rows (the pattern of a query and the train examples that taught it). The
reference is ``fastinfluence.score`` streaming every row (exact top-k); recall@10 is the
fraction of its top-10 that the index returns.

    python bench/index_recall.py [--rows 1000000 --dim 512 --out bench/results/index_recall_cpu.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import time

import torch

from fastinfluence import score
from fastinfluence.features import Features, LayerSlice
from fastinfluence.index import build_index


def synthetic(rows: int, dim: int, clusters: int, seed: int, chunk: int = 65536) -> Features:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g)
    centers /= centers.norm(dim=1, keepdim=True)
    data = torch.empty(rows, dim, dtype=torch.float16)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        c = torch.randint(0, clusters, (n,), generator=g)
        x = centers[c] + torch.randn(n, dim, generator=g) / dim**0.5
        data[s : s + n] = (x * torch.randn(n, 1, generator=g).mul(0.5).exp()).half()
    layout = {"layer": LayerSlice(0, dim, (dim // 16, 16))}
    return Features(data, data.float().norm(dim=1), list(range(rows)), layout, None, {})


def recall(got: torch.Tensor, ref: torch.Tensor) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), ref.tolist())) / ref.numel()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=2048)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--pq-m", type=int, default=64)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 32])
    ap.add_argument("--metrics", nargs="+", default=["cosine", "dot"])
    ap.add_argument(
        "--pq-metrics", nargs="+", default=["cosine"], help="metrics that also build the (slow to train) ivfpq index"
    )
    ap.add_argument("--refine", type=int, default=10)
    ap.add_argument("--train-rows", type=int, default=40_960)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/index_recall_cpu.json")
    args = ap.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    train = synthetic(args.rows, args.dim, args.clusters, seed=0)
    g = torch.Generator().manual_seed(1)
    pick = torch.randint(0, args.rows, (args.queries,), generator=g)
    qx = train.data[pick].float()
    qx = qx + torch.randn(qx.shape, generator=g) * qx.norm(dim=1, keepdim=True) / args.dim**0.5
    query = Features(qx, qx.norm(dim=1), [f"q{i}" for i in range(args.queries)], train.layout, None, {})
    results = []
    for metric in args.metrics:
        ref, t_stream = timed(lambda: score(query, train, metric=metric, topk=10, chunk_rows=65536))
        entry = {"metric": metric, "streaming_s": t_stream, "indexes": []}
        for kind in ("flat", "ivf", "ivfpq") if metric in args.pq_metrics else ("flat", "ivf"):
            idx, t_build = timed(
                lambda: build_index(train, metric, kind=kind, nlist=args.nlist, m=args.pq_m, train_rows=args.train_rows)
            )
            probes = [None] if kind == "flat" else args.nprobe
            for nprobe, refine in [(p, r) for p in probes for r in ((1, args.refine) if kind == "ivfpq" else (1,))]:
                if nprobe is not None:
                    idx.nprobe = nprobe
                idx.refine = refine
                got, t_query = timed(lambda: score(query, train, metric=metric, topk=10, index=idx))
                entry["indexes"].append(
                    {
                        "kind": kind,
                        "nprobe": nprobe,
                        "refine": refine,
                        "build_s": t_build,
                        "query_s": t_query,
                        "query_ms_per_query": 1000 * t_query / args.queries,
                        "recall_at_10": recall(got.topk_indices, ref.topk_indices),
                        "bytes_per_row": {"flat": 4 * args.dim, "ivf": 4 * args.dim, "ivfpq": args.pq_m}[kind],
                    }
                )
                print(json.dumps(entry["indexes"][-1]), flush=True)
            idx = None  # free the index before the next kind
            gc.collect()
        results.append(entry)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {
        "bench": "index_recall",
        "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads, shared machine)",
        "commit": commit,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "rows": args.rows,
        "dim": args.dim,
        "store_dtype": "float16",
        "queries": args.queries,
        "data": f"{args.clusters} cluster directions x log-normal norms + isotropic noise; queries = noisy train rows",
        "nlist": args.nlist,
        "pq_m": args.pq_m,
        "pq_nbits": 8,
        "kmeans_train_rows": args.train_rows,
        "note": "refine = candidates per wanted entry re-ranked with the exact float16 rows (refine 1: raw index "
        "scores)",
        "results": results,
    }
    print(json.dumps(out, indent=2))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
