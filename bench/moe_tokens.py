"""Per-token factors on MoE experts: extraction time and token-file size.

One Mixtral-config model (8 experts, top-2, every block captured: attention, routers, each
expert's ``gate_up_proj`` and ``down_proj``, the LM head), instruction-like batches (the first
half of each sequence the prompt). Measured:

- ``extract`` vs ``extract(tokens=True)``: medians of interleaved rounds, one thread;
- the token file of a store: bytes of the expert layers' rows (a~, g~, their offsets and token
  positions: top-k rows per token per MoE block and fused parameter) against what the shared
  token layout would take with a zero row per token for every expert (E rows per token), and
  the bytes of the other layers;
- ``token_scores`` of a few train rows from the store, checked to add up to ``score``.

    python bench/moe_tokens.py [--out bench/results/moe_tokens_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from _common import commit, interleaved_medians, rel_err
from moe_extract import instruction_batch, mixtral
from safetensors import safe_open

from fastinfluence import GradientExtractor, ProjectionConfig
from fastinfluence.scoring import score, token_scores


def token_bytes(store_path: Path, routed: set[str]) -> dict[str, int]:
    """Bytes of the token files' tensors: the expert layers' (a, g, o, p) and the others'."""
    out = {"experts": 0, "other": 0, "experts_dense_equivalent": 0}
    for f in sorted((store_path / "shards").glob("tokens-*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tokens = st.get_tensor("offsets")[-1].item()
            for key in st.keys():
                t = st.get_slice(key)
                size = t.get_shape()
                n = 1
                for s in size:
                    n *= s
                nbytes = n * {"F32": 4, "F64": 8, "I64": 8, "BF16": 2, "F16": 2}[t.get_dtype()]
                layer = key.split(".", 1)[1] if "." in key else None
                if layer in routed:
                    out["experts"] += nbytes
                    if key[0] in "ag":  # the shared layout: one row per token, zero where not routed
                        out["experts_dense_equivalent"] += tokens * size[1] * (nbytes // max(n, 1))
                else:
                    out["other"] += nbytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/moe_tokens_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = mixtral(args)
    batch = instruction_batch(args.vocab, args.batch, args.seq, args.seed)
    query = instruction_batch(args.vocab, 2, args.seq, args.seed + 1)
    ext = GradientExtractor(model, ProjectionConfig(rank_in=args.rank, rank_out=args.rank))
    routed = {l.name for l in ext.layers if l.routed}
    times = interleaved_medians(
        {"extract": lambda: ext.extract([batch]), "extract_tokens": lambda: ext.extract([batch], tokens=True)},
        args.repeats,
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = ext.extract([batch], tokens=True, store=str(Path(tmp) / "train"))
        sizes = token_bytes(store.path, routed)
        q = ext.extract([query])
        rows = list(range(len(store)))
        start = time.perf_counter()
        per_token = token_scores(q, store, rows)
        token_seconds = time.perf_counter() - start
        res = score(q, store, topk=len(store), aggregates=())
        S = torch.zeros(len(q), len(store)).scatter_(1, res.topk_indices, res.topk_values)
        err = rel_err(torch.stack([s.sum(1) for s in per_token], 1), S)
    record = {
        "benchmark": "moe_tokens",
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread, shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f})",
        "config": vars(args),
        "captured_layers": len(ext.layers),
        "expert_layers": len(routed),
        "seconds": {k: round(v, 4) for k, v in times.items()},
        "tokens_over_plain": round(times["extract_tokens"] / times["extract"], 3),
        "token_file_bytes": sizes,
        "experts_bytes_over_dense_layout": round(sizes["experts"] / sizes["experts_dense_equivalent"], 4),
        "token_scores_seconds": round(token_seconds, 4),
        "token_scores_sum_vs_score_rel_err": err,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
