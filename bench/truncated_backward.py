"""Extraction that skips unneeded work against the full backward.

For three layer sets (LM head only, last block only, every Linear layer) one extraction
step is timed as the extractor runs it (the backward cut at the lowest captured layer; for
the LM head alone no backward at all) and through the full backward from the input
embeddings, beside one plain training step (forward + backward with weight gradients).
For the LM head the backward cut at the head's input is timed too, and, as its floor, one
plain forward (no grad: the hidden states and logits any LM-head feature needs), each also
under ``autocast="bfloat16"``. CPU seconds (process time, one thread), runs interleaved,
median of ``--reps``.

    python bench/truncated_backward.py [--out bench/results/truncated_backward_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from unittest import mock

import torch
from _common import bench_llama

from fastinfluence import GradientExtractor, ProjectionConfig, capture

SETS = {"lm_head": [r"lm_head$"], "last_block": [r"layers\.3\."], "all_layers": [r"."]}


def cpu_medians(fns: dict, reps: int) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/truncated_backward_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = bench_llama(intermediate=512)
    ids = torch.randint(0, 512, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def train_step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def autograd(ex, full: bool):
        def run():
            fused, ex.capture.fused = ex.capture.fused, None  # through the capture pass
            try:
                if not full:
                    return ex.extract([batch])
                start = lambda m, _l: ("embeddings", m.get_input_embeddings())  # noqa: E731
                with mock.patch.object(capture, "backward_start", start):
                    return ex.extract([batch])
            finally:
                ex.capture.fused = fused

        return run

    @torch.no_grad()
    def forward(dtype=None):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            model(**batch)

    fns = {"train_step": train_step, "forward": forward, "forward_bf16": lambda: forward(torch.bfloat16)}
    for name, include in SETS.items():
        ex = GradientExtractor(model, ProjectionConfig(include=include, rank_in=args.rank, rank_out=args.rank))
        fns[f"{name}/truncated"] = lambda ex=ex: ex.extract([batch])
        fns[f"{name}/full"] = autograd(ex, full=True)
        if name == "lm_head":
            fns[f"{name}/cut_autograd"] = autograd(ex, full=False)
            low = GradientExtractor(
                model, ProjectionConfig(include=include, rank_in=args.rank, rank_out=args.rank, autocast="bfloat16")
            )
            fns[f"{name}/truncated_bf16"] = lambda low=low: low.extract([batch])
    t = cpu_medians(fns, args.reps)
    rows = [
        {
            "layers": name,
            "path": "no backward"
            if name == "lm_head"
            else "backward cut at the lowest captured block"
            if name != "all_layers"
            else "backward to the lowest block (all captured)",
            "truncated_cpu_s": t[f"{name}/truncated"],
            "full_cpu_s": t[f"{name}/full"],
            "speedup": t[f"{name}/full"] / t[f"{name}/truncated"],
            "truncated_over_train_step": t[f"{name}/truncated"] / t["train_step"],
        }
        for name in SETS
    ]
    rows[0]["cut_autograd_cpu_s"] = t["lm_head/cut_autograd"]
    rows[0]["speedup_vs_cut_autograd"] = t["lm_head/cut_autograd"] / t["lm_head/truncated"]
    # the floor: no LM-head feature costs less than the forward that gives its hidden states
    rows[0]["forward_cpu_s"] = t["forward"]
    rows[0]["truncated_over_forward"] = t["lm_head/truncated"] / t["forward"]
    rows[0]["full_over_forward"] = t["lm_head/full"] / t["forward"]
    rows[0]["bf16_cpu_s"] = t["lm_head/truncated_bf16"]
    rows[0]["bf16_speedup"] = t["lm_head/full"] / t["lm_head/truncated_bf16"]
    rows[0]["forward_bf16_cpu_s"] = t["forward_bf16"]
    out = {
        "model": {"arch": "llama", "hidden": 256, "layers": 4, "vocab": 512},
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "reps": args.reps,
        "threads": 1,
        "train_step_cpu_s": t["train_step"],
        "rows": rows,
        "device": f"cpu ({platform.machine()}, 1 thread)",
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
