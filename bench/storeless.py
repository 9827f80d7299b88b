"""Scoring without a store (``score_batches``) against extracting a store and scoring it.

Same model as bench/truncated_backward.py, ``--train`` random-token examples in batches of
16, 16 queries, top-10. CPU seconds (process time, one thread), interleaved, median of
``--reps``; the top-k of both paths is checked to be identical.

    python bench/storeless.py [--out bench/results/storeless_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time

import torch
from _common import bench_llama

import fastinfluence as fi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/storeless_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = bench_llama(intermediate=512)

    def batches(n, seed):
        ids = torch.randint(0, 512, (n, args.seq), generator=torch.Generator().manual_seed(seed))
        return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids.split(16)]

    train = batches(args.train, 1)
    ex = fi.GradientExtractor(
        model, fi.ProjectionConfig(rank_in=args.rank, rank_out=args.rank, exclude=[r"lm_head", r"embed"])
    )
    query = ex.extract(batches(16, 2))
    results = {}

    def via_store():
        d = tempfile.mkdtemp()
        try:
            return fi.score(query, ex.extract(train, store=f"{d}/s"), topk=10)
        finally:
            shutil.rmtree(d)

    fns = {"store_then_score": via_store, "score_batches": lambda: fi.score_batches(ex, query, train, topk=10)}
    times = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            t0 = time.process_time()
            results[k] = fn()
            times[k].append(time.process_time() - t0)
    same = torch.equal(results["store_then_score"].topk_indices, results["score_batches"].topk_indices)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "model": {"arch": "llama", "hidden": 256, "layers": 4, "vocab": 512},
        "train": args.train,
        "seq": args.seq,
        "queries": 16,
        "topk": 10,
        "rank": args.rank,
        "reps": args.reps,
        "cpu_s": med,
        "speedup": med["store_then_score"] / med["score_batches"],
        "same_topk": same,
        "device": f"cpu ({platform.machine()}, 1 thread)",
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
