"""Run every peer on the same model, data and layers, interleaved, one process per run.

    python bench/peers/run_all.py [--reps 3] [--tools fastinfluence,bergson] [--sets fixed,variable]
    python bench/peers/run_all.py --shape real [--reps 2] [--sets qwen2,v32k]

``--shape toy`` (the default) writes bench/results/peers_cpu.json: the 4-layer Llama of
``common.MODEL``, vocabulary 512. ``--shape real`` writes bench/results/peers_realshape_cpu.json:
the workloads of ``common.REAL`` (a Qwen2-shaped model at vocabulary 151,936 x 512 tokens, the
projected, exact and head-captured settings; vocabulary 32,000 x 1,024 tokens, projected), each
workload with its own model and data under WORK/<workload>. Per (tool, data set, setting) the median CPU seconds,
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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from common import MODEL, QWEN2, REAL, build_model, build_real_model, captures_head, datasets, real_data  # noqa: E402

PEERS = Path(os.environ.get("PEERS_DIR", ROOT / ".peers"))
# tool -> (virtualenv python, distribution whose version is recorded, settings it runs)
TOOLS = {
    "fastinfluence": (ROOT / ".venv/bin/python", "fastinfluence", ("proj16", "proj64", "exact", "head16")),
    # the same runner with ProjectionConfig(autocast="bfloat16"): an option, reported beside float32
    "fastinfluence-bf16": (ROOT / ".venv/bin/python", "fastinfluence", ("proj16", "proj64", "exact")),
    "bergson": (PEERS / "bergson/bin/python", "bergson", ("proj16", "proj64", "exact", "head16")),
    "dattri-llm": (PEERS / "dattri-llm/bin/python", "dattri-llm", ("proj16", "proj64", "exact", "head16")),
    "logix": (PEERS / "logix-ai/bin/python", "logix-ai", ("proj16", "proj64", "head16")),
    "kronfluence": (PEERS / "kronfluence/bin/python", "kronfluence", ("exact",)),
    # the model itself in bfloat16 (as bergson-bf16 runs it)
    "fastinfluence-bf16model": (ROOT / ".venv/bin/python", "fastinfluence", ("proj16", "proj64")),
    # the peers' own low-precision settings, beside fastinfluence-bf16
    "bergson-bf16": (PEERS / "bergson/bin/python", "bergson", ("proj16", "proj64", "exact")),
    "kronfluence-bf16": (PEERS / "kronfluence/bin/python", "kronfluence", ("exact",)),
}
TRAK = PEERS / "traker/bin/python"
# the settings each data set runs (a tool runs those of its own it shares); head16 is proj16 with
# the LM head captured, a real-shape setting only
SET_SETTINGS = {
    "fixed": ("proj16", "proj64", "exact"),
    "variable": ("proj16", "proj64", "exact"),
    "qwen2": ("proj16", "exact", "head16"),
    "v32k": ("proj16",),
}
# the real shapes run each tool at the float32 setting it recommends (the low-precision variants stay on the toy)
REAL_TOOLS = ("fastinfluence", "bergson", "dattri-llm", "logix", "kronfluence")
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
    shutil.rmtree(out, ignore_errors=True)  # a rerun replaces the run it repeats
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


def prepare(shape: str, work: Path, sets: list[str]) -> dict[str, Path]:
    """Save the model(s) and data sets once; the WORK directory of each data set."""
    if shape == "toy":
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "model").exists():
            build_model().save_pretrained(work / "model")
        for name, d in datasets().items():
            torch.save(d, work / f"data_{name}.pt")
        return {ds: work for ds in sets}
    dirs = {}
    for ds in sets:
        dirs[ds] = work / ds
        dirs[ds].mkdir(parents=True, exist_ok=True)
        if not (dirs[ds] / "model").exists():
            build_real_model(ds).save_pretrained(dirs[ds] / "model")
        torch.save(real_data(ds), dirs[ds] / f"data_{ds}.pt")
    return dirs


def describe(shape: str, reps: int) -> dict:
    meta = {
        "shape": shape,
        "load_average_1min_at_start": os.getloadavg()[0],
        "loss": "mean answer-token cross-entropy per example",
        "score": "raw gradient inner product",
        "threads": int(os.environ.get("PEERS_THREADS", "1")),
        "reps": reps,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    if shape == "toy":
        meta["model"] = {"arch": "LlamaForCausalLM", **MODEL}
        meta["layers"] = "q,k,v,o,gate,up,down of every block (28)"
        meta["data"] = {
            "fixed": "512 train + 64 query, 64 random tokens, all tokens answer tokens",
            "variable": "512 train + 64 query instruction-like, 9-110 tokens, loss on the answer only",
        }
    else:
        meta["model"] = {"arch": "Qwen2ForCausalLM", "tie_word_embeddings": True, **QWEN2}
        meta["layers"] = "q,k,v,o,gate,up,down of both blocks (14); head16 adds the tied LM head (its share)"
        meta["data"] = {
            ds: f"vocabulary {w['vocab']:,}: {w['train']} train + {w['query']} query random-token sequences of "
            f"{w['seq']} tokens, loss on the last {w['answer']}"
            for ds, w in REAL.items()
        }
    return meta


def reference(ds: str, head: bool, work: Path, timeout: float) -> np.ndarray:
    """Exact scores by per-example autograd (the LM head's share included when ``head``), computed once."""
    ref_dir = work / (f"reference_{ds}_head" if head else f"reference_{ds}")
    if not (ref_dir / "scores.npy").exists():
        print(f"exact reference scores on {ds}{' with the LM head' if head else ''} (per-example autograd) ...")
        rec = launch(TOOLS["fastinfluence"][0], "reference", work, "head" if head else "exact", ref_dir, ds, timeout)
        if not rec.get("ok"):
            raise SystemExit(f"reference failed: {rec.get('error')}")
    return np.load(ref_dir / "scores.npy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("toy", "real"), default="toy")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--first-rep", type=int, default=0, help="number the repetitions from here (adds to WORK's runs)")
    ap.add_argument("--tools", default=None, help="comma-separated; default: every tool of the shape")
    ap.add_argument("--sets", default=None, help="default: fixed,variable (toy) or qwen2,v32k (real)")
    ap.add_argument("--settings", default=None, help="run only these settings (comma-separated)")
    ap.add_argument("--work", default=None, help="default: .peers/work (toy) or .peers/work_real (real)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default=None, help="default: bench/results/peers_cpu.json or peers_realshape_cpu.json")
    ap.add_argument(
        "--collect", action="store_true", help="run nothing: rebuild the JSON from the runs already in --work"
    )
    args = ap.parse_args()
    real = args.shape == "real"
    tools = (args.tools or ",".join(REAL_TOOLS if real else [*TOOLS, "trak"])).split(",")
    sets = (args.sets or ("qwen2,v32k" if real else "fixed,variable")).split(",")
    work = Path(args.work or PEERS / ("work_real" if real else "work"))
    out_path = Path(args.out or ROOT / "bench/results" / ("peers_realshape_cpu.json" if real else "peers_cpu.json"))
    dirs = prepare(args.shape, work, sets)
    meta = describe(args.shape, args.reps)
    results, versions, skipped = [], {}, {}
    for t in (t for t in tools if t in TOOLS):
        python = TOOLS[t][0]
        if not python.exists() or (python.parent.parent / ".failed").exists():
            skipped[t] = f"no virtualenv at {python.parent.parent} (run bench/peers/setup.sh)"
        else:
            versions[t] = version(python, TOOLS[t][1])
    if "trak" in tools and TRAK.exists():
        skipped["trak"] = trak_probe(work, args.collect, args.timeout)
    for ds in sets:
        wanted = SET_SETTINGS[ds] if args.settings is None else set(args.settings.split(",")) & set(SET_SETTINGS[ds])
        runs = [(t, s) for t in tools if t in TOOLS and t in versions for s in TOOLS[t][2] if s in wanted]
        refs = {h: reference(ds, h, dirs[ds], args.timeout * 4) for h in {captures_head(s) for _, s in runs}}
        rows = {key: [] for key in runs}

        def scored(rec: dict, out: Path, setting: str) -> dict:
            if rec.get("ok"):
                rec.update(agreement(np.load(out / "scores.npy"), refs[captures_head(setting)]))
            return rec

        if args.collect:
            for t, s in runs:
                for out in sorted((dirs[ds] / "runs" / ds).glob(f"{t}_{s}_*")):
                    if (out / "result.json").exists():
                        rows[(t, s)].append(scored(json.loads((out / "result.json").read_text()), out, s))
        for rep in range(args.first_rep, args.first_rep + (0 if args.collect else args.reps)):
            shift = rep % max(len(runs), 1)
            for t, s in runs[shift:] + runs[:shift]:
                out = dirs[ds] / "runs" / ds / f"{t}_{s}_{rep}"
                rec = scored(launch(TOOLS[t][0], t, dirs[ds], s, out, ds, args.timeout), out, s)
                print(
                    f"[{ds} rep {rep}] {t:13s} {s:6s} "
                    + (
                        f"cpu {rec['cpu_s']:6.1f} s  wall {rec['wall_s']:6.1f} s  peak {rec['peak_rss_mb']:6.0f} MiB  "
                        f"spearman {rec['spearman']:.3f}"
                        if rec.get("ok")
                        else f"FAILED {rec.get('error', '')[:300]}"
                    ),
                    flush=True,
                )
                rows[(t, s)].append(rec)
        results += [summary(t, versions[t], ds, s, recs) for (t, s), recs in rows.items()]
        # written after each data set, so an interrupted run keeps what it measured
        meta["load_average_1min_at_end"] = os.getloadavg()[0]
        out_path.write_text(
            json.dumps({"meta": meta, "versions": versions, "skipped": skipped, "rows": results}, indent=1)
        )
    print(f"wrote {out_path}")


def summary(tool: str, version: str, ds: str, setting: str, recs: list[dict]) -> dict:
    """One table cell: medians over the successful runs, the agreement of the first, or the error."""
    ok = [r for r in recs if r.get("ok")]
    row = {"tool": tool, "version": version, "dataset": ds, "setting": setting, "runs": len(recs), "ok_runs": len(ok)}
    if not ok:
        row["error"] = recs[0].get("error") if recs else "not run"
        return row
    for k in ("cpu_s", "wall_s", "peak_rss_mb", "loaded_rss_mb"):
        if all(k in r for r in ok):
            row[k] = float(np.median([r[k] for r in ok]))
    row["cpu_s_all"] = [round(r["cpu_s"], 2) for r in ok]
    row["peak_rss_mb_all"] = [round(r["peak_rss_mb"]) for r in ok]
    row.update({k: ok[0][k] for k in ("spearman", "rel_err", "rel_err_scaled", "best_scale", "method")})
    return row


def trak_probe(work: Path, collect: bool, timeout: float) -> dict | str:
    """Why TRAK is not run: the measured cost of its CPU projector on one batch."""
    probe = work / "trak_probe.json"
    if not (collect and probe.exists()):
        subprocess.run(
            ["nice", "-n", "10", str(TRAK), str(HERE / "run_trak.py"), str(work), str(probe)],
            cwd=HERE,
            capture_output=True,
            timeout=timeout,
        )
    if not probe.exists():
        return "the projection-cost probe failed"
    p = json.loads(probe.read_text())
    batches = sum(-(-n // p["batch"]) for n in (512, 64))
    return {
        **p,
        "reason": (
            f"not run: TRAK projects the full {p['grad_dim']:,}-dim gradient; its fast projector is CUDA-only and "
            f"its CPU BasicProjector took {p['cpu_s_per_batch']:.0f} CPU s for one batch of {p['batch']} at its "
            f"default proj_dim={p['proj_dim']}, i.e. about {p['cpu_s_per_batch'] * batches / 60:.0f} CPU minutes "
            f"of projection alone per data set"
        ),
    }


if __name__ == "__main__":
    main()
