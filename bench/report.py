"""Build the README's results table from the JSON files in bench/results/.

    python bench/report.py                 # print the table
    python bench/report.py --update README.md   # replace the table between the results markers

Each file's figures are formatted by the function registered for its bench; a file no
formatter knows is listed by name so nothing measured is silently left out.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _extract_vs_train(d: dict) -> list[str]:
    m = d["model"]
    return [
        f"| extraction step vs training step | Llama {m['hidden']}-d, {m['layers']} layers, vocab {m['vocab']}, "
        f"{d['batch']}x{d['seq']} tokens, {d['captured_layers']} layers at rank {d['rank'][0]}x{d['rank'][1]} | "
        f"extract {d['extract_step_s'] * 1e3:.0f} ms vs train {d['train_step_s'] * 1e3:.0f} ms "
        f"(ratio {d['ratio_extract_over_train']:.2f}) | {d['device']} |"
    ]


def _scoring(d: dict) -> list[str]:
    meta = d["meta"]
    return [
        f"| streaming scoring, {r['rows']:,} rows of D={r['dim']} {r['dtype']} ({r['store_gb']:.2f} GB store), "
        f"{meta['queries']} queries, top-{meta['topk']} | | {r['rows_per_s']:,.0f} rows/s, peak RSS {r['peak_rss_mb']:.0f} MB | "
        f"cpu, {meta['cpus']} cores |"
        for r in d["results"]
    ]


def _lce(d: dict) -> list[str]:
    out, rows = [], d["rows"]
    for r in rows:
        if r["provider"] != "chunked":
            continue
        ref = next((m for m in rows if m["provider"] == "materialised" and (m["N"], m["H"], m["V"], m["dtype"]) == (r["N"], r["H"], r["V"], r["dtype"])), None)
        if ref is None:
            continue
        out.append(
            f"| linear cross-entropy fwd+bwd, chunked vs materialised logits | N={r['N']}, H={r['H']}, V={r['V']}, {r['dtype']} | "
            f"peak extra {r['peak_extra_MiB']:.0f} MiB vs {ref['peak_extra_MiB']:.0f} MiB; {r['median_s']:.1f} s vs {ref['median_s']:.1f} s | {r['device']} |"
        )
    return out


def _jl(d: dict) -> list[str]:
    out = []
    for r in d["rows"]:
        if r.get("provider") == "fastinfluence-cpu" and "speedup_vs_trak" in r:
            out.append(
                f"| jl_project vs TRAK BasicProjector | {r['shape']} | {r['ms']:.1f} ms, {r['speedup_vs_trak']:.0f}x TRAK, "
                f"no stored matrix | cpu, {d['meta']['threads']} threads |"
            )
    return out


def _extract_memory(d: dict) -> list[str]:
    r = {row["path"]: row for row in d["rows"]}
    return [
        f"| extraction peak memory, loss from hidden states vs B x T x V logits | {d['model']['arch']}, vocab "
        f"{d['model']['vocab']}, {d['batch']}x{d['seq']} tokens | {r['fused']['peak_extra_MiB']:.0f} MiB vs "
        f"{r['logits']['peak_extra_MiB']:.0f} MiB; {r['fused']['seconds']:.1f} s vs {r['logits']['seconds']:.1f} s | {d['device']} |"
    ]


def _ops(d: dict) -> list[str]:
    return [
        f"| `fastinfluence bench` {r['op']} ({r['size']}) | backend {r['backend']} | {r['median_s'] * 1e3:.2f} ms, "
        f"{r['gflops']:.1f} GFLOP/s, rel err vs torch {r['rel_err_vs_torch']:.0e} | {r['device']}, {d['meta']['threads']} threads |"
        for r in d["rows"]
    ]


def _compile(d: dict) -> list[str]:
    n = len(d["variants"])
    return [
        f"| Triton kernels compiled for {d['target']} without a GPU (`make check-triton`) | {n} variants "
        f"(kernel x config x dtype) | {d['failed']} failed, {d['spilling']} spill registers, {d['over_shared_limit']} "
        f"over {d['shared_limit_bytes']:,} B shared memory (pruned at run time) | triton {d['triton']} |"
    ]


FORMATTERS = {
    "ops_cpu.json": _ops,
    "extract_memory_cpu.json": _extract_memory,
    "extract_vs_train_cpu.json": _extract_vs_train,
    "scoring_cpu.json": _scoring,
    "linear_cross_entropy_cpu.json": _lce,
    "jl_project_cpu.json": _jl,
}


def table() -> str:
    lines = ["| benchmark | shape | result | device |", "|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        fmt = FORMATTERS.get(path.name) or (_compile if path.name.startswith("triton_compile_") else None)
        if fmt is None:
            lines.append(f"| `{path.name}` | | see file | |")
            continue
        lines += fmt(json.loads(path.read_text()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", metavar="README", help="rewrite the table between the results markers of this file")
    args = ap.parse_args()
    text = table()
    if not args.update:
        print(text)
        return
    path = Path(args.update)
    doc = path.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    path.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{text}\n{END}", doc, flags=re.S))


if __name__ == "__main__":
    main()
