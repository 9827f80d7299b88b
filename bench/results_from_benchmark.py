"""Turn a pytest-benchmark JSON (``pytest bench/ --benchmark-json=PATH``) into bench/results/ records.

    python bench/results_from_benchmark.py PATH [--results bench/results] [--suffix cpu]

Writes ``pytest_bench_<suffix>.json`` (every case: median / min / mean / stddev seconds,
rounds, what it timed, with the commit, timer and machine) and, from the ``ops`` group,
``ops_<suffix>.json`` in the layout ``fastinfluence bench --json`` writes (one row per op and
backend, with ``ran``: the backend that actually ran). Derived ratios of the extraction cases
(extraction over a training step; full over truncated path) go into the first file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _machine(d: dict) -> dict:
    m = d.get("machine_info", {})
    cpu = m.get("cpu", {})
    return {
        "node": m.get("node"),
        "machine": m.get("machine"),
        "cpu": cpu.get("brand_raw"),
        "cores": cpu.get("count"),
        "flags_bf16": "avx512_bf16" in cpu.get("flags", []),
        "python": m.get("python_version"),
        "system": f"{m.get('system')} {m.get('release')}",
    }


def _commit(d: dict) -> dict:
    c = d.get("commit_info", {})
    return {"id": (c.get("id") or "")[:12], "dirty": c.get("dirty"), "branch": c.get("branch")}


def rows(d: dict) -> list[dict]:
    out = []
    for b in d["benchmarks"]:
        s = b["stats"]
        out.append(
            {
                "name": b["fullname"],
                "group": b.get("group"),
                "median_s": s["median"],
                "min_s": s["min"],
                "mean_s": s["mean"],
                "stddev_s": s["stddev"],
                "rounds": s["rounds"],
                "timer": b["options"].get("timer"),
                **b.get("extra_info", {}),
            }
        )
    return out


def derived(rs: list[dict]) -> dict:
    ext = {(r["layers"], r["path"]): r["median_s"] for r in rs if r.get("case") == "extract"}
    train = next((r["median_s"] for r in rs if r.get("case") == "train_step"), None)
    out = {}
    for (layers, path), sec in ext.items():
        key = f"{layers}/{path}"
        if train:
            out[f"{key}/over_train_step"] = sec / train
        if path != "full" and (layers, "full") in ext:
            out[f"{key}/speedup_vs_full"] = ext[(layers, "full")] / sec
    return out


def ops_record(d: dict, rs: list[dict]) -> dict:
    ops = [r for r in rs if r.get("group") == "ops"]
    torch_version = next((r.get("torch") for r in ops if r.get("torch")), None)
    return {
        "meta": {
            "torch": torch_version,
            "threads": ops[0]["threads"] if ops else None,
            "machine": d.get("machine_info", {}).get("machine"),
            "commit": _commit(d)["id"][:7],
            "timer": ops[0]["timer"] if ops else None,
            "source": "pytest bench/test_ops.py (pytest-benchmark), converted by bench/results_from_benchmark.py",
        },
        "rows": [
            {
                "op": r["op"],
                "backend": r["backend"],
                "ran": r["ran"],
                "fallback": r["fallback"],
                "device": r["device"],
                "size": r["size"],
                "median_s": r["median_s"],
                "gflops": r["flops"] / r["median_s"] / 1e9,
                "rel_err_vs_torch": r["rel_err_vs_torch"],
            }
            for r in ops
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--suffix", default="cpu")
    args = ap.parse_args()
    d = json.loads(Path(args.json).read_text())
    rs = rows(d)
    if not rs:
        raise SystemExit(f"{args.json} holds no benchmark: run pytest bench/ --benchmark-json={args.json}")
    results = Path(args.results)
    record = {
        "meta": {
            "commit": _commit(d),
            "datetime": d.get("datetime"),
            "pytest_benchmark": d.get("version"),
            "machine": _machine(d),
        },
        "rows": rs,
        "derived": derived(rs),
    }
    (results / f"pytest_bench_{args.suffix}.json").write_text(json.dumps(record, indent=1))
    written = [f"pytest_bench_{args.suffix}.json"]
    if any(r.get("group") == "ops" for r in rs):
        (results / f"ops_{args.suffix}.json").write_text(json.dumps(ops_record(d, rs), indent=2))
        written.append(f"ops_{args.suffix}.json")
    print("wrote " + ", ".join(str(results / w) for w in written))


if __name__ == "__main__":
    main()
