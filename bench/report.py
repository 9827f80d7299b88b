"""Build the results tables of docs/benchmarks.md and the README's headline from bench/results/.

    python bench/report.py              # print the tables
    python bench/report.py --update     # rewrite them between their markers in PAGES, redraw the plot
    python bench/report.py --update other.md   # PAGES and the pages named

A page holds any of the marker pairs (the results table, the peer tables); each pair it holds
is rewritten, and every table must land on at least one page.

Each file's figures are formatted by the function registered for its bench; a file no
formatter knows is listed by name so nothing measured is silently left out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
# where the generated tables live: the full tables, and the README's headline peer table
PAGES = (ROOT / "docs" / "benchmarks.md", ROOT / "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"
PEERS_START, PEERS_END = "<!-- peers:start -->", "<!-- peers:end -->"
PEERS_JSON, PEERS_PLOT = RESULTS / "peers_cpu.json", ROOT / "docs" / "peers_cpu.svg"
# the same benchmark with every tool in its own low precision (a separate run)
LOW_START, LOW_END = "<!-- peers-bf16:start -->", "<!-- peers-bf16:end -->"
LOW_JSON = RESULTS / "peers_bf16_cpu.json"
# the peer benchmark at real shapes (the README's headline), one row per (workload, setting)
REAL_START, REAL_END = "<!-- peers-real:start -->", "<!-- peers-real:end -->"
REAL_JSON = RESULTS / "peers_realshape_cpu.json"
WORKLOADS = {"qwen2": "vocab 151,936 x 512 tokens", "v32k": "vocab 32,000 x 1,024 tokens"}
REAL_SETTINGS = {"proj16": "projected 16x16", "exact": "exact scores", "head16": "projected 16x16, LM head captured"}
SETTINGS = {
    "proj16": "projected 16x16, build + score",
    "proj64": "projected 64x64, build + score",
    "exact": "exact scores",
}
DATASETS = {"fixed": "fixed-length", "variable": "variable-length"}


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
        f"{meta['queries']} queries, top-{meta['topk']} | | {r['rows_per_s']:,.0f} rows/s, peak RSS "
        f"{r['peak_rss_mb']:.0f} MB | "
        f"cpu, {meta['cpus']} cores |"
        for r in d["results"]
    ]


def _lce(d: dict) -> list[str]:
    out, rows = [], d["rows"]
    for r in rows:
        if r["provider"] != "chunked":
            continue
        ref = next(
            (
                m
                for m in rows
                if m["provider"] == "materialised"
                and (m["N"], m["H"], m["V"], m["dtype"]) == (r["N"], r["H"], r["V"], r["dtype"])
            ),
            None,
        )
        if ref is None:
            continue
        out.append(
            f"| linear cross-entropy fwd+bwd, chunked vs materialised logits | N={r['N']}, H={r['H']}, V={r['V']}, "
            f"{r['dtype']} | "
            f"peak extra {r['peak_extra_MiB']:.0f} MiB vs {ref['peak_extra_MiB']:.0f} MiB; {r['median_s']:.1f} s vs "
            f"{ref['median_s']:.1f} s | {r['device']} |"
        )
    return out


def _jl(d: dict) -> list[str]:
    out = []
    for r in d["rows"]:
        if r.get("provider") == "fastinfluence-cpu" and "speedup_vs_trak" in r:
            out.append(
                f"| jl_project vs TRAK BasicProjector | {r['shape']} | {r['ms']:.1f} ms, {r['speedup_vs_trak']:.0f}x "
                f"TRAK, "
                f"no stored matrix | cpu, {d['meta']['threads']} threads |"
            )
    return out


def _extract_memory(d: dict) -> list[str]:
    r = {row["path"]: row for row in d["rows"]}
    return [
        f"| extraction peak memory, loss from hidden states vs B x T x V logits | {d['model']['arch']}, vocab "
        f"{d['model']['vocab']}, {d['batch']}x{d['seq']} tokens | {r['fused']['peak_extra_MiB']:.0f} MiB vs "
        f"{r['logits']['peak_extra_MiB']:.0f} MiB; {r['fused']['seconds']:.1f} s vs {r['logits']['seconds']:.1f} s | "
        f"{d['device']} |"
    ]


def _ops(d: dict) -> list[str]:
    return [
        f"| `fastinfluence bench` {r['op']} ({r['size']}) | backend {r['backend']} | {r['median_s'] * 1e3:.2f} ms, "
        f"{r['gflops']:.1f} GFLOP/s, rel err vs torch {r['rel_err_vs_torch']:.0e} | {r['device']}, "
        f"{d['meta']['threads']} threads |"
        for r in d["rows"]
    ]


def _compile(d: dict) -> list[str]:
    n = len(d["variants"])
    return [
        f"| Triton kernels compiled for {d['target']} without a GPU (`make check-triton`) | {n} variants "
        f"(kernel x config x dtype) | {d['failed']} failed, {d['spilling']} spill registers, {d['over_shared_limit']} "
        f"over {d['shared_limit_bytes']:,} B shared memory (pruned at run time) | triton {d['triton']} |"
    ]


def _truncated(d: dict) -> list[str]:
    m = d["model"]
    return [
        f"| extraction of {r['layers']}, {r.get('path', 'backward cut')} vs full backward | Llama {m['hidden']}-d, "
        f"{m['layers']} layers, vocab {m['vocab']}, {d['batch']}x{d['seq']} tokens, rank {d['rank']} | "
        f"{r['truncated_cpu_s'] * 1e3:.0f} ms vs {r['full_cpu_s'] * 1e3:.0f} ms CPU ({r['speedup']:.2f}x); "
        f"{r['truncated_over_train_step']:.2f}x a training step"
        + (
            f"; {r['truncated_over_forward']:.2f}x a plain forward (the floor); bf16 autocast "
            f"{r['bf16_cpu_s'] * 1e3:.0f} ms ({r['bf16_speedup']:.2f}x)"
            if "forward_cpu_s" in r
            else ""
        )
        + f" | {d['device']} |"
        for r in d["rows"]
    ]


def _storeless(d: dict) -> list[str]:
    c = d["cpu_s"]
    return [
        f"| scoring without a store (score_batches) vs extract to a store + score | {d['train']} train x {d['seq']} "
        f"tokens, {d['queries']} queries, top-{d['topk']}, rank {d['rank']} | {c['score_batches']:.1f} s vs "
        f"{c['store_then_score']:.1f} s CPU ({d['speedup']:.2f}x), same top-k: {d['same_topk']} | {d['device']} |"
    ]


def _kfac_vs_kronfluence(d: dict) -> list[str]:
    c, a = d["cpu_s"], d["agreement"]
    return [
        f"| full-dimension EK-FAC vs Kronfluence {d['versions']['kronfluence']} EK-FAC | peer model, "
        f"{d['settings'].get('train', 512)} train x {d['settings'].get('query', 64)} queries | "
        f"{c['ours']:.1f} s vs {c['kronfluence']:.1f} s CPU ({c['kronfluence'] / c['ours']:.2f}x), "
        f"Spearman {a['spearman_mean']:.6f}, rel err {a['rel_err']:.1e} | {d['device']} |"
    ]


def _callback_overhead(d: dict) -> list[str]:
    m = d["model"]
    return [
        f"| InfluenceCallback ({' + '.join(d.get('features', ['gradient']))} rows) overhead per training step | "
        f"Llama {m['hidden']}-d, {m['layers']} layers, vocab "
        f"{m['vocab']}, {d['batch']}x{d['seq']} tokens, rank {d['rank'][0]}x{d['rank'][1]}"
        f"{', LoRA r' + str(d['lora_rank']) + ' on every Linear' if d.get('lora_rank') else ''} | "
        f"{d['step_cpu_s_with'] * 1e3:.0f} ms vs {d['step_cpu_s_without'] * 1e3:.0f} ms CPU "
        f"(+{d['step_overhead'] * 100:.1f}%), load {d['load_average_1min_at_end']:.1f} | {d['device']} |"
    ]


def _trajectory_demo(d: dict) -> list[str]:
    t, p = d["trajectory"]["last_epoch_of_each_interval"], d["post_hoc"]
    last = d["training"]["checkpoint_steps"][-1]

    def cell(r):
        return f"{r['auroc']:.3f} / {r['precision_at_k']:.2f}"

    return [
        f"| trajectory detection, demo backdoor (AUROC / precision@k) | {d['data']['n_train']} examples, "
        f"{len(d['training']['checkpoint_steps'])} checkpoints | TracIn-CP {cell(t['tracin_lr_interval_mean'])}, "
        f"LESS {cell(t['less_lr_interval_max'])}, LESS last checkpoint {cell(t[f'less_checkpoint_{last}_only_mean'])}; "
        f"post-hoc cosine {cell(p['influence_cosine_max'])} | {d['device']} |"
    ]


def _moe_extract(d: dict) -> list[str]:
    m, t, mem = d["model"], d["seconds"], d["memory"]
    peak = " / ".join(f"{mem[k]['step_extra_mib']:.0f}" for k in ("ours", "padded_grid", "train_grouped_mm"))
    return [
        "| MoE extraction vs padded per-expert grid and training step | "
        f"Mixtral {m['hidden']}-d, {m['layers']} layers, "
        f"{m['experts']} experts top-{m['top_k']}, vocab {m['vocab']}, {d['batch']}x{d['seq']} tokens, "
        f"{d['captured_layers']} layers at rank {d['rank'][0]}x{d['rank'][1]} | ours {t['ours']:.2f} s, padded grid "
        f"{t['padded_grid']:.2f} s ({d['speedup_ours_vs_padded_grid']:.2f}x), train step {t['train_grouped_mm']:.2f} s "
        f"grouped_mm / {t['train_eager']:.2f} s eager (ours {d['ratio_ours_over_train']['grouped_mm']:.2f}x / "
        f"{d['ratio_ours_over_train']['eager']:.2f}x); step RSS over setup {peak} MiB (ours / grid / train) "
        f"| {d['device']} |"
    ]


def _moe_demo(d: dict) -> list[str]:
    det = ("ensemble_layers_exact_cosine_max", "influence_cosine_max")

    def cell(v: dict) -> str:
        return " / ".join(f"{v[k]:.3f}" for k in det)

    cells = "; ".join(f"{name}: dense {cell(v['dense'])}, MoE {cell(v['moe'])}" for name, v in d["mean_auroc"].items())
    return [
        f"| demo detection AUROC, dense vs MoE variant (default / projected cosine, mean over seeds) | "
        f"{d['moe']['experts']} experts top-{d['moe']['top_k']}, seeds {', '.join(map(str, d['seeds']))} | {cells} "
        f"| {d['device']} |"
    ]


FORMATTERS = {
    "moe_extract_cpu.json": _moe_extract,
    "moe_demo_cpu.json": _moe_demo,
    "train_callback_overhead_cpu.json": _callback_overhead,
    "train_callback_overhead_less_cpu.json": _callback_overhead,
    "train_callback_overhead_less_lora_cpu.json": _callback_overhead,
    "trajectory_demo_cpu.json": _trajectory_demo,
    "kfac_vs_kronfluence_cpu.json": _kfac_vs_kronfluence,
    "storeless_cpu.json": _storeless,
    "truncated_backward_cpu.json": _truncated,
    "ops_cpu.json": _ops,
    "extract_memory_cpu.json": _extract_memory,
    "extract_vs_train_cpu.json": _extract_vs_train,
    "scoring_cpu.json": _scoring,
    "linear_cross_entropy_cpu.json": _lce,
    "jl_project_cpu.json": _jl,
}


def _peer_cells(d: dict) -> tuple[list[str], dict]:
    ours = sorted({r["tool"] for r in d["rows"] if r["tool"].startswith("fastinfluence")}, key=len)
    tools = ours + sorted({r["tool"] for r in d["rows"]} - set(ours))
    return tools, {(r["tool"], r["dataset"], r["setting"]): r for r in d["rows"]}


def _peer_cell(r: dict | None, fmt: str) -> str:
    """One tool's cell: "—" when it did not run that setting, "failed" when its run failed."""
    return "—" if r is None else "failed" if "cpu_s" not in r else fmt.format(**r)


def peers_table(d: dict) -> str:
    """CPU seconds (median over repetitions) and mean Spearman with exact scores, one column per tool."""
    tools, cell = _peer_cells(d)
    head = "| data | setting | " + " | ".join(f"{t} {d['versions'].get(t, '')}".strip() for t in tools) + " |"
    lines = [head, "|---|---|" + "---|" * len(tools)]
    for ds in DATASETS:
        for st in SETTINGS:
            if not any((t, ds, st) in cell for t in tools):
                continue
            vals = [_peer_cell(cell.get((t, ds, st)), "{cpu_s:.1f} s (ρ {spearman:.2f})") for t in tools]
            lines.append(f"| {DATASETS[ds]} | {SETTINGS[st]} | " + " | ".join(vals) + " |")
    for t, why in d.get("skipped", {}).items():
        lines.append(f"\n{t}: {why['reason'] if isinstance(why, dict) else why}.")
    m = d["meta"]
    runs = sorted({r.get("ok_runs", 0) for r in d["rows"] if r.get("ok_runs")}) or [0]
    n = str(runs[0]) if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
    lines.append(
        f"\nCPU seconds of the whole build + score (median of {n} interleaved run(s) per cell, "
        f"{m['threads']} thread each), ρ = mean per-query Spearman correlation with exact scores. "
        f"Model: Llama {m['model']['hidden_size']}-d, {m['model']['num_hidden_layers']} layers, vocab "
        f"{m['model']['vocab_size']}; layers: {m['layers']}."
    )
    return "\n".join(lines)


def _ratios(cell: dict, tools: list[str], key: tuple[str, str]) -> tuple[str, str]:
    """Ours against the fastest peer in CPU time (x faster) and the leanest peer in peak RSS (fraction)."""
    ours = cell.get(("fastinfluence", *key))
    peers = [cell.get((t, *key), {}) for t in tools if not t.startswith("fastinfluence")]
    peers = [r for r in peers if "cpu_s" in r]
    if ours is None or "cpu_s" not in ours or not peers:
        return "—", "—"
    fast = min(peers, key=lambda r: r["cpu_s"])
    lean = min(peers, key=lambda r: r["peak_rss_mb"])
    return (
        f"{fast['cpu_s'] / ours['cpu_s']:.2f}x ({fast['tool']})",
        f"{ours['peak_rss_mb'] / lean['peak_rss_mb']:.2f} ({lean['tool']})",
    )


def realshape_table(d: dict) -> str:
    """CPU seconds, peak RSS and Spearman per tool for each real-shape workload, with ours against the peers."""
    tools, cell = _peer_cells(d)
    head = "| workload | setting | " + " | ".join(f"{t} {d['versions'].get(t, '')}".strip() for t in tools)
    lines = [
        head + " | fastest peer / ours, CPU | ours / leanest peer, peak |",
        "|---|---|" + "---|" * (len(tools) + 2),
    ]
    for ds in WORKLOADS:
        for st in REAL_SETTINGS:
            if not any((t, ds, st) in cell for t in tools):
                continue
            fmt = "{cpu_s:.1f} s, {peak_rss_mb:,.0f} MiB (ρ {spearman:.2f})"
            vals = [_peer_cell(cell.get((t, ds, st)), fmt) for t in tools]
            lines.append(
                f"| {WORKLOADS[ds]} | {REAL_SETTINGS[st]} | "
                + " | ".join([*vals, *_ratios(cell, tools, (ds, st))])
                + " |"
            )
    for r in d["rows"]:
        if "error" in r:
            lines.append(
                f"\n{r['tool']}, {WORKLOADS[r['dataset']]}, {REAL_SETTINGS[r['setting']]}: failed: {r['error'][:300]}"
            )
    for t, why in d.get("skipped", {}).items():
        lines.append(f"\n{t}: {why['reason'] if isinstance(why, dict) else why}.")
    m = d["meta"]
    runs = sorted({r.get("ok_runs", 0) for r in d["rows"] if r.get("ok_runs")}) or [0]
    n = str(runs[0]) if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
    lines.append(
        f"\nCPU seconds of the whole build + score and the process's peak RSS (median of {n} interleaved run(s) "
        f"per cell, {m['threads']} thread each, model and data loaded included), ρ = mean per-query Spearman "
        f"correlation with exact scores (for the LM-head row, exact scores with the head's share). Model: Qwen2 "
        f"widths ({m['model']['hidden_size']}-d, MLP {m['model']['intermediate_size']:,}, "
        f"{m['model']['num_attention_heads']}/{m['model']['num_key_value_heads']} heads), "
        f"{m['model']['num_hidden_layers']} layers, tied head, random weights; "
        + "; ".join(m["data"].values())
        + f"; layers: {m['layers']}."
    )
    return "\n".join(lines)


def peers_plot(d: dict, path: Path) -> None:
    """Grouped horizontal bars of CPU seconds, one group per (data set, setting), as a plain SVG."""
    tools, cell = _peer_cells(d)
    colours = ["#1b6ac9", "#e07b39", "#3a9e5c", "#b54ea8", "#8c8c8c", "#c9a21b"]
    groups = [(ds, st) for ds in DATASETS for st in SETTINGS if any((t, ds, st) in cell for t in tools)]
    top = max((r.get("cpu_s", 0) for r in d["rows"]), default=1) or 1
    bar, gap, left, width = 14, 16, 260, 420
    y, parts = 30, []
    for ds, st in groups:
        parts.append(f'<text x="4" y="{y + bar}" font-size="12">{DATASETS[ds]}, {SETTINGS[st]}</text>')
        for i, t in enumerate(tools):
            r = cell.get((t, ds, st))
            if r is None or "cpu_s" not in r:
                continue
            w = width * r["cpu_s"] / top
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{colours[i % 6]}"/>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 3}" font-size="10">{r["cpu_s"]:.1f} s</text>')
            y += bar
        y += gap
    legend = "".join(
        f'<rect x="{left + 110 * i}" y="6" width="10" height="10" fill="{colours[i % 6]}"/>'
        f'<text x="{left + 14 + 110 * i}" y="15" font-size="11">{t}</text>'
        for i, t in enumerate(tools)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{y + 10}" '
        f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>{legend}'
        f"{''.join(parts)}</svg>\n"
    )


def _replace(doc: str, start: str, end: str, text: str) -> str:
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", doc, flags=re.S)


def update(pages: list[Path], tables: dict[tuple[str, str], str]) -> None:
    """Rewrite each (start, end) marker pair found on each page; a table no page holds is an error."""
    placed = set()
    for path in pages:
        doc = original = path.read_text()
        for markers, text in tables.items():
            if markers[0] in doc and markers[1] in doc:
                doc = _replace(doc, *markers, text)
                placed.add(markers)
        if doc != original:
            path.write_text(doc)
    missing = [markers[0] for markers in tables if markers not in placed]
    if missing:
        raise SystemExit(f"no page of {[str(p) for p in pages]} holds the markers {missing}")


def table() -> str:
    lines, others = ["| benchmark | shape | result | device |", "|---|---|---|---|"], []
    for path in sorted(RESULTS.glob("*.json")):
        if path in (PEERS_JSON, LOW_JSON, REAL_JSON):
            continue
        fmt = FORMATTERS.get(path.name) or (_compile if path.name.startswith("triton_compile_") else None)
        if fmt is None:
            others.append(f"`{path.name}`")
            continue
        lines += fmt(json.loads(path.read_text()))
    if others:  # studies whose numbers the docs pages quote (demo, detector, peers' rechecks)
        lines.append(f"\nAlso in `bench/results/`, quoted in the pages of docs/: {', '.join(others)}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--update",
        nargs="*",
        metavar="PAGE",
        type=Path,
        help="rewrite the tables between their markers in docs/benchmarks.md, README.md and the pages named",
    )
    args = ap.parse_args()
    text = table()
    peers = json.loads(PEERS_JSON.read_text()) if PEERS_JSON.exists() else None
    real = json.loads(REAL_JSON.read_text()) if REAL_JSON.exists() else None
    if args.update is None:
        print("\n\n".join([text] + ([realshape_table(real)] if real else []) + ([peers_table(peers)] if peers else [])))
        return
    tables = {(START, END): text}
    if peers is not None:
        tables[PEERS_START, PEERS_END] = peers_table(peers)
        peers_plot(peers, PEERS_PLOT)
    if real is not None:
        tables[REAL_START, REAL_END] = realshape_table(real)
    if LOW_JSON.exists():
        tables[LOW_START, LOW_END] = peers_table(json.loads(LOW_JSON.read_text()))
    update(list(dict.fromkeys(p.resolve() for p in [*PAGES, *args.update])), tables)


if __name__ == "__main__":
    main()
