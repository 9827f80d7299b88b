"""Time one extraction step against one training step on the same model and batch.

Extraction = forward + backward with parameter gradients off, per-layer projection of
(A, G) inside the backward (GradientExtractor.extract). Training step = forward +
backward with weight gradients (the plain HF loss). Goal: extraction no slower.

    python bench/extract_vs_train.py [--out bench/results/extract_vs_train_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from _common import add_model_args, bench_llama, commit, interleaved_medians, model_record

from fastinfluence import GradientExtractor, ProjectionConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="bench/results/extract_vs_train_cpu.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = bench_llama(args.vocab, args.hidden, args.layers, heads=8, kv_heads=4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def train_step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    extractor = GradientExtractor(model, ProjectionConfig(rank_in=args.rank, rank_out=args.rank))

    def extract_step():
        extractor.extract([batch])

    medians = interleaved_medians({"train": train_step, "extract": extract_step}, args.reps, warmup=2)
    t_train, t_extract = medians["train"], medians["extract"]
    model.zero_grad(set_to_none=True)
    result = {
        "bench": "extract_vs_train",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit(),
        "torch": torch.__version__,
        "model": model_record(args, model),
        "batch": args.batch,
        "seq": args.seq,
        "rank": [args.rank, args.rank],
        "captured_layers": len(extractor.layers),
        "feature_dim": extractor.dim,
        "train_step_s": t_train,
        "extract_step_s": t_extract,
        "ratio_extract_over_train": t_extract / t_train,
    }
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
