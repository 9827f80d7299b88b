"""Would packing beat length bucketing here? Forward + backward of the peer benchmark's variable-length
train set (bench/peers, tiny Llama, eager attention, 1 thread) three ways:

- length-bucketed batches of <= 2048 padded tokens (what extraction does now);
- packed rows of R tokens (first-fit decreasing), a 4D block-diagonal causal mask (additive, 0 / -inf)
  and position ids restarting per example, for R in --rows.

Also checks that the packed per-example losses equal the unpacked ones (transformers takes a 4D
mask as given), so the only question is speed. Writes bench/results/packing_probe_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent))
from common import MODEL, build_model, datasets, example_losses, pad  # noqa: E402

from fastinfluence.batching import length_batches  # noqa: E402


def pack_rows(lengths: list[int], row: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(free):
            if f >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row - lengths[i])
    return rows


def packed_losses(model, examples: list[dict], row: list[int]) -> torch.Tensor:
    ids = torch.tensor([t for i in row for t in examples[i]["input_ids"]])[None]
    labels = [list(examples[i]["labels"]) for i in row]
    for lab in labels:
        lab[
            0
        ] = -100  # an example's first token is never a target (the previous example's last token must not predict it)
    labels = torch.tensor([t for lab in labels for t in lab])[None]
    seg = torch.tensor([k for k, i in enumerate(row) for _ in examples[i]["input_ids"]])
    pos = torch.cat([torch.arange(len(examples[i]["input_ids"])) for i in row])[None]
    L = ids.shape[1]
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[0, :-1]
    tok = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="none")
    target = seg[1:]
    valid = (labels[0, 1:] != -100).double()
    sums = torch.zeros(len(row), dtype=tok.dtype).index_add(0, target, tok)
    counts = torch.zeros(len(row), dtype=torch.float64).index_add(0, target, valid)
    return sums / counts.to(tok.dtype)


def timed(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", default="256,512,2048", help="packed row lengths R, comma-separated (default 256,512,2048)"
    )
    rows_arg = [int(r) for r in ap.parse_args().rows.split(",")]
    torch.set_num_threads(1)
    model = build_model()
    train = datasets()["variable"]["train"]
    lengths = [len(e["input_ids"]) for e in train]
    plan = length_batches(lengths, batch_size=None, max_tokens=2048, window=None)
    bucketed = [(idx, pad([train[i] for i in idx])) for idx in plan]

    def run_bucketed():
        for _, b in bucketed:
            example_losses(model, b).sum().backward()

    ref = torch.zeros(len(train))
    with torch.no_grad():
        for idx, b in bucketed:
            ref[idx] = example_losses(model, b)
    out = {"meta": {"model": MODEL, "threads": 1, "load_avg_before": os.getloadavg(), "torch": torch.__version__}}
    results = [{"how": "length-bucketed, 2048 tokens per batch", "cpu_s": min(timed(run_bucketed) for _ in range(2))}]
    for R in rows_arg:
        packs = pack_rows(lengths, R)
        got = torch.zeros(len(train))
        with torch.no_grad():
            for row in packs:
                got[row] = packed_losses(model, train, row).float()

        def run_packed(packs=packs):
            for row in packs:
                packed_losses(model, train, row).sum().backward()

        results.append(
            {
                "how": f"packed rows of {R} tokens, 4D block-diagonal mask",
                "rows": len(packs),
                "fill": sum(lengths) / (R * len(packs)),
                "max_abs_loss_diff_vs_unpacked": float((got - ref).abs().max()),
                "cpu_s": min(timed(run_packed) for _ in range(2)),
            }
        )
    out["meta"]["load_avg_after"] = os.getloadavg()
    out["rows"] = results
    (HERE / "results/packing_probe_cpu.json").write_text(json.dumps(out, indent=1) + "\n")
    for r in results:
        print(r)


if __name__ == "__main__":
    main()
