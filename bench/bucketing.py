"""Length-bucketed vs data-order batches on the peer benchmark's data (bench/peers), our runner only.

    python bench/bucketing.py [--reps 3] [--sets variable] [--settings proj16,proj64,exact] [--budgets 2048]

Runs bench/peers/run_fastinfluence.py (one process per run, niced, interleaved) with
``FI_PEER_BATCHING=order`` (batches of 32 in data order, the runner's old setting) and with
length-bucketed batches of each token budget, and writes bench/results/bucketing_cpu.json:
per (data set, setting, batching) the median CPU seconds, the padded tokens computed, and
how far the bucketed scores are from the data-order ones (relative Frobenius error: the
same numbers in another order of float32 sums). Load averages before and after are recorded:
CPU time is the fair measure on a shared machine, but contention still inflates it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(ROOT))
from common import MODEL, build_model, datasets  # noqa: E402

from fastinfluence.batching import length_batches  # noqa: E402


def padded_tokens(examples: list[dict], batching: str) -> dict:
    lengths = [len(e["input_ids"]) for e in examples]
    if batching == "order":
        plan = [list(range(s, min(s + 32, len(lengths)))) for s in range(0, len(lengths), 32)]
    else:
        plan = length_batches(lengths, batch_size=None, max_tokens=int(batching), window=None)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    return {
        "batches": len(plan),
        "padded_tokens": padded,
        "real_tokens": sum(lengths),
        "pad_fraction": 1 - sum(lengths) / padded,
    }


def launch(work: Path, setting: str, batching: str, out: Path, dataset: str) -> dict:
    env = dict(os.environ, FI_PEER_BATCHING="order" if batching == "order" else "length")
    if batching != "order":
        env["FI_PEER_MAX_TOKENS"] = batching
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        str(HERE / "peers/run_fastinfluence.py"),
        str(work),
        setting,
        str(out),
        dataset,
    ]
    subprocess.run(cmd, env=env, cwd=HERE / "peers", check=True, capture_output=True)
    rec = json.loads((out / "result.json").read_text())
    if not rec.get("ok"):
        raise SystemExit(f"{setting} {batching} failed: {rec.get('error')}")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sets", default="variable")
    ap.add_argument("--settings", default="proj16,proj64,exact")
    ap.add_argument("--budgets", default="2048", help="token budgets per bucketed batch, comma-separated")
    ap.add_argument("--work", help="directory for the model, data and runs (default: a fresh temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/bucketing_cpu.json"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fastinfluence_bucketing_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"model, data and runs in {work}", flush=True)
    if not (work / "model").exists():
        build_model().save_pretrained(work / "model")
    data = datasets()
    for name, d in data.items():
        torch.save(d, work / f"data_{name}.pt")
    modes = ["order", *args.budgets.split(",")]
    load_before = os.getloadavg()
    rows = []
    for ds in args.sets.split(","):
        runs = [(s, m) for s in args.settings.split(",") for m in modes]
        recs: dict = {r: [] for r in runs}
        for rep in range(args.reps):
            shift = rep % len(runs)
            for s, m in runs[shift:] + runs[:shift]:
                out = work / "runs" / ds / f"{s}_{m}_{rep}"
                rec = launch(work, s, m, out, ds)
                recs[(s, m)].append((rec, out))
                print(
                    f"[{ds} rep {rep}] {s:6s} {m:6s} cpu {rec['cpu_s']:6.2f} s  wall {rec['wall_s']:6.2f} s", flush=True
                )
        for s, m in runs:
            ref = np.load(recs[(s, "order")][0][1] / "scores.npy")
            S = np.load(recs[(s, m)][0][1] / "scores.npy")
            cpu = [r["cpu_s"] for r, _ in recs[(s, m)]]
            base = median(r["cpu_s"] for r, _ in recs[(s, "order")])
            rows.append(
                {
                    "dataset": ds,
                    "setting": s,
                    "batching": "data order, batch 32" if m == "order" else f"length-bucketed, {m} tokens per batch",
                    "cpu_s": median(cpu),
                    "cpu_s_runs": cpu,
                    "wall_s": median(r["wall_s"] for r, _ in recs[(s, m)]),
                    "speedup_vs_data_order": base / median(cpu),
                    "rel_err_vs_data_order": float(np.linalg.norm(S - ref) / np.linalg.norm(ref)),
                    "train": padded_tokens(data[ds]["train"], m),
                    "method": recs[(s, m)][0][0].get("method"),
                }
            )
    result = {
        "meta": {
            "what": "bench/peers/run_fastinfluence.py, data-order vs length-bucketed batches (median CPU s)",
            "model": MODEL,
            "threads": int(os.environ.get("PEERS_THREADS", "1")),
            "reps": args.reps,
            "cores": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['dataset']:8s} {r['setting']:6s} {r['batching']:40s} cpu {r['cpu_s']:6.2f} s  "
            f"x{r['speedup_vs_data_order']:.2f}  pad {r['train']['pad_fraction']:.2f}  "
            f"err {r['rel_err_vs_data_order']:.1e}"
        )


if __name__ == "__main__":
    main()
