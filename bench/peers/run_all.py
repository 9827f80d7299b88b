"""Run every peer on the same model, data and layers, interleaved, one process per run.

    python bench/peers/run_all.py [--reps 3] [--tools fastinfluence,bergson] [--sets fixed,variable]

Writes bench/results/peers_cpu.json: per (tool, data set, setting) the median CPU seconds,
wall seconds and peak RSS over the repetitions, and the agreement of its scores with the exact
ones (mean per-query Spearman over train examples; relative Frobenius error, raw and after the
best single scale). Runs are interleaved (every tool once per repetition, order rotated) and
niced, so a busy machine slows every tool alike; CPU time is the fair measure there.
A peer whose virtualenv is missing, or whose run fails, is recorded with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from common import MODEL, build_model, datasets  # noqa: E402

PEERS = Path(os.environ.get("PEERS_DIR", ROOT / ".peers"))
# tool -> (virtualenv python, distribution whose version is recorded, settings it runs)
TOOLS = {
    "fastinfluence": (ROOT / ".venv/bin/python", "fastinfluence", ("proj16", "proj64", "exact")),
    # the same runner with ProjectionConfig(autocast="bfloat16"): an option, reported beside float32
    "fastinfluence-bf16": (ROOT / ".venv/bin/python", "fastinfluence", ("proj16", "proj64", "exact")),
    "bergson": (PEERS / "bergson/bin/python", "bergson", ("proj16", "proj64", "exact")),
    "dattri-llm": (PEERS / "dattri-llm/bin/python", "dattri-llm", ("proj16", "proj64", "exact")),
    "logix": (PEERS / "logix-ai/bin/python", "logix-ai", ("proj16", "proj64")),
    "kronfluence": (PEERS / "kronfluence/bin/python", "kronfluence", ("exact",)),
    # the model itself in bfloat16 (as bergson-bf16 runs it)
    "fastinfluence-bf16model": (ROOT / ".venv/bin/python", "fastinfluence", ("proj16", "proj64")),
    # the peers' own low-precision settings, beside fastinfluence-bf16
    "bergson-bf16": (PEERS / "bergson/bin/python", "bergson", ("proj16", "proj64", "exact")),
    "kronfluence-bf16": (PEERS / "kronfluence/bin/python", "kronfluence", ("exact",)),
}
TRAK = PEERS / "traker/bin/python"
SCRIPT = {
    "dattri-llm": "run_dattri_llm.py",
    "fastinfluence-bf16": "run_fastinfluence_bf16.py",
    "fastinfluence-bf16model": "run_fastinfluence_bf16model.py",
    "bergson-bf16": "run_bergson_bf16.py",
    "kronfluence-bf16": "run_kronfluence_bf16.py",
}


def spearman(S: np.ndarray, R: np.ndarray) -> float:
    """Mean over queries of the rank correlation between a tool's and the exact train scores."""

    def ranks(x):
        return np.argsort(np.argsort(x, axis=1), axis=1).astype(np.float64)

    a, b = ranks(S), ranks(R)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


def agreement(S: np.ndarray, R: np.ndarray) -> dict:
    c = float((S * R).sum() / max((S * S).sum(), 1e-300))
    n = np.linalg.norm(R)
    return {
        "spearman": spearman(S, R),
        "rel_err": float(np.linalg.norm(S - R) / n),
        "rel_err_scaled": float(np.linalg.norm(c * S - R) / n),
        "best_scale": c,
    }


def version(python: Path, dist: str) -> str:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


def launch(python: Path, tool: str, work: Path, setting: str, out: Path, dataset: str, timeout: float) -> dict:
    script = HERE / SCRIPT.get(tool, f"run_{tool}.py")
    cmd = ["nice", "-n", "10", str(python), str(script), str(work), setting, str(out), dataset]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    rec = (
        json.loads((out / "result.json").read_text())
        if (out / "result.json").exists()
        else {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    )
    rec["process_wall_s"] = time.perf_counter() - t0
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tools", default=",".join([*TOOLS, "trak"]))
    ap.add_argument("--sets", default="fixed,variable")
    ap.add_argument("--work", default=str(PEERS / "work"))
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default=str(ROOT / "bench/results/peers_cpu.json"))
    ap.add_argument(
        "--collect", action="store_true", help="run nothing: rebuild the JSON from the runs already in --work"
    )
    args = ap.parse_args()
    work, tools, sets = Path(args.work), args.tools.split(","), args.sets.split(",")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").exists():
        build_model().save_pretrained(work / "model")
    for name, d in datasets().items():
        torch.save(d, work / f"data_{name}.pt")

    meta = {
        "load_average_1min_at_start": os.getloadavg()[0],
        "model": {"arch": "LlamaForCausalLM", **MODEL},
        "layers": "q,k,v,o,gate,up,down of every block (28)",
        "loss": "mean answer-token cross-entropy per example",
        "score": "raw gradient inner product",
        "threads": int(os.environ.get("PEERS_THREADS", "1")),
        "reps": args.reps,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "data": {
            "fixed": "512 train + 64 query, 64 random tokens, all tokens answer tokens",
            "variable": "512 train + 64 query instruction-like, 9-110 tokens, loss on the answer only",
        },
    }
    results, versions, skipped = [], {}, {}
    for t in (t for t in tools if t in TOOLS):
        python = TOOLS[t][0]
        if not python.exists() or (python.parent.parent / ".failed").exists():
            skipped[t] = f"no virtualenv at {python.parent.parent} (run bench/peers/setup.sh)"
        else:
            versions[t] = version(python, TOOLS[t][1])
    if "trak" in tools and TRAK.exists():
        versions["trak"] = version(TRAK, "traker")
        probe = work / "trak_probe.json"
        if not (args.collect and probe.exists()):
            subprocess.run(
                ["nice", "-n", "10", str(TRAK), str(HERE / "run_trak.py"), str(work), str(probe)],
                cwd=HERE,
                capture_output=True,
                timeout=args.timeout,
            )
        if probe.exists():
            p = json.loads(probe.read_text())
            batches = sum(-(-n // p["batch"]) for n in (512, 64))
            skipped["trak"] = {
                **p,
                "reason": (
                    f"not run: TRAK projects the full {p['grad_dim']:,}-dim gradient; its fast projector is "
                    f"CUDA-only and "
                    f"its CPU BasicProjector took {p['cpu_s_per_batch']:.0f} CPU s for one batch of {p['batch']} at "
                    f"its "
                    f"default proj_dim={p['proj_dim']}, i.e. about {p['cpu_s_per_batch'] * batches / 60:.0f} CPU "
                    f"minutes "
                    f"of projection alone per data set"
                ),
            }
        else:
            skipped["trak"] = "the projection-cost probe failed"
    for ds in sets:
        ref_dir = work / f"reference_{ds}"
        if not (ref_dir / "scores.npy").exists():
            print(f"exact reference scores on {ds} (per-example autograd) ...", flush=True)
            rec = launch(TOOLS["fastinfluence"][0], "reference", work, "exact", ref_dir, ds, args.timeout * 4)
            if not rec.get("ok"):
                raise SystemExit(f"reference failed: {rec.get('error')}")
        R = np.load(ref_dir / "scores.npy")
        runs = [(t, s) for t in tools if t in TOOLS and t in versions for s in TOOLS[t][2]]
        rows = {key: [] for key in runs}
        if args.collect:
            for t, s in runs:
                for out in sorted((work / "runs" / ds).glob(f"{t}_{s}_*")):
                    if (out / "result.json").exists():
                        rec = json.loads((out / "result.json").read_text())
                        if rec.get("ok"):
                            rec.update(agreement(np.load(out / "scores.npy"), R))
                        rows[(t, s)].append(rec)
        for rep in range(0 if args.collect else args.reps):
            shift = rep % max(len(runs), 1)
            for t, s in runs[shift:] + runs[:shift]:
                out = work / "runs" / ds / f"{t}_{s}_{rep}"
                rec = launch(TOOLS[t][0], t, work, s, out, ds, args.timeout)
                if rec.get("ok"):
                    rec.update(agreement(np.load(out / "scores.npy"), R))
                print(
                    f"[{ds} rep {rep}] {t:13s} {s:6s} "
                    + (
                        f"cpu {rec['cpu_s']:6.1f} s  wall {rec['wall_s']:6.1f} s  spearman {rec['spearman']:.3f}"
                        if rec.get("ok")
                        else f"FAILED {rec.get('error', '')[:300]}"
                    ),
                    flush=True,
                )
                rows[(t, s)].append(rec)
        for (t, s), recs in rows.items():
            ok = [r for r in recs if r.get("ok")]
            row = {
                "tool": t,
                "version": versions[t],
                "dataset": ds,
                "setting": s,
                "runs": len(recs),
                "ok_runs": len(ok),
            }
            if ok:
                for k in ("cpu_s", "wall_s", "peak_rss_mb"):
                    row[k] = float(np.median([r[k] for r in ok]))
                row["cpu_s_all"] = [round(r["cpu_s"], 2) for r in ok]
                row.update({k: ok[0][k] for k in ("spearman", "rel_err", "rel_err_scaled", "best_scale", "method")})
            else:
                row["error"] = recs[0].get("error") if recs else "not run"
            results.append(row)
        # written after each data set, so an interrupted run keeps what it measured
        meta["load_average_1min_at_end"] = os.getloadavg()[0]
        Path(args.out).write_text(
            json.dumps({"meta": meta, "versions": versions, "skipped": skipped, "rows": results}, indent=1)
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
