"""The demo under a stated protocol: detectors chosen on data seeds 0-4, reported on seeds 5-14.

Each seed trains the demo's model (``make demo``'s recipe, both scenarios) and scores every train
example with the demo's 12 detectors and the candidates below. The default detector is chosen by
:data:`RULE` from the development seeds' files alone; the held-out seeds are run after that choice
and no choice reads them. On held-out seeds the chosen detector's forget set is then unlearned with
:data:`UNLEARN` (retraining from scratch is not run: 20 CPU seconds a scenario, and the demo's
own runs on seeds 0-3 already show it keeps the stealthy backdoor).

Resumable: one JSON per seed under ``--dir``; a rerun skips the seeds whose file exists (a held-out
file made under another choice is refused). The summary (``--out``) gives per detector and per
unlearning run the mean / min / max over the held-out seeds, and the development seeds apart.

    python bench/demo_seeds.py [--seeds 0 1 ... 14 --dir bench/results/demo_seeds \\
        --out bench/results/demo_seeds.json]

Candidate detectors (cosine, max over the reports unless named otherwise):

- ``ensemble_projection_seeds_cosine_max``: the projected attention+MLP cosine (32x32) averaged
  over 4 projection seeds before the max (the projection alone moves AUROC by up to 0.2);
- ``ensemble_layers_exact_cosine_max``: exact cosine of each layer group (per block: attention,
  MLP input layers, MLP output layer) averaged over the 6 groups, so no group's scale dominates;
- ``exact_block0_cosine_max``: exact gradients of the whole first block;
- ``exact_first_mlp_in_cosine_mean``: the default's layers, mean over the reports;
- ``exact_first_mlp_in_contrastive_max``: query = gradient of the reported (poisoned) answer minus
  that of the clean answer of the same prompt, on the default's layers (RapidUn's contrast);
- ``exact_first_mlp_in_expanded_max``: the default's top-15 other examples added to the queries
  and every example rescored (the unreported behaviours share only the trigger with the reports);
- ``ensemble_rank``: mean rank over the influence detectors above and the demo's exact and
  trajectory detectors.

Skipping (the demo's ``skip_low_influence`` drops the forget examples of lowest mean cosine with the
*reports*): here also ranked by self-influence (squared norm of the example's own projected
gradient, what the seed paper of low-influence skipping thresholds: an example's impact on the
model) and by mean cosine with the whole forget set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import commit

from fastinfluence import GradientExtractor, ProjectionConfig, exact_scores
from fastinfluence.demo import detect, unlearn
from fastinfluence.demo.data import SCENARIOS, batches, encode, make_scenario, train_tokenizer
from fastinfluence.demo.model import Recipe, Timer, train_model

DEV, HELD_OUT = tuple(range(5)), tuple(range(5, 15))
FLOOR = 0.80  # stealthy AUROC every development seed must reach
BACKDOOR_FLOOR = 0.95  # the backdoor bound, on every development seed
RULE = (
    f"On the development seeds {DEV[0]}-{DEV[-1]} only: among the detectors that are not trivial baselines and "
    f"reach backdoor AUROC >= {BACKDOOR_FLOOR} on every one of them, the highest mean stealthy AUROC among those "
    f"with stealthy AUROC >= {FLOOR} on every one; if none reaches the floor, the highest minimum stealthy AUROC."
)
UNLEARN = ("rapidun", "skip_low_influence", "skip_random")
SKIP_BY = ("self_influence", "forget_set_influence")
PROJECTION_SEEDS = 4


def _cos(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return F.normalize(Q.double(), dim=1) @ F.normalize(X.double(), dim=1).T


def _contrastive(model, poisoned_b, clean_b, train_b, config) -> torch.Tensor:
    """(R, N) cosine of (g(poisoned answer) - g(clean answer)) with every train gradient, from exact
    dot products: cos = (D_p - D_c) / (|g_p - g_c| |g_t|), |g_t| read off the ratio of dot to cosine."""
    both = poisoned_b + clean_b
    D = exact_scores(model, both, train_b, config, metric="dot").double()
    C = exact_scores(model, both, train_b, config, metric="cosine").double()
    G = exact_scores(model, both, both, config, metric="dot").double()
    R = D.shape[0] // 2
    qn = G.diagonal().clamp_min(0).sqrt()
    ratio = D / (C * qn[:, None])
    tn = torch.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0).abs().max(0).values  # (N,)
    diff = (G.diagonal()[:R] + G.diagonal()[R:] - 2 * G.diagonal(R)).clamp_min(0).sqrt()
    out = (D[:R] - D[R:]) / (diff[:, None] * tn[None, :])
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def candidates(model, tok, sc, seed: int, feats: dict, found: dict) -> dict[str, torch.Tensor]:
    """name -> (N,) scores of the candidate detectors (module docstring)."""
    pad = tok.pad_token_id
    enc = [encode(tok, e.prompt, e.response) for e in sc.train]
    train_b = batches(enc, pad, 64)
    query_b = batches([enc[i] for i in sc.reported], pad, 64, ids=sc.reported)
    clean_b = batches(
        [encode(tok, sc.train[i].prompt, sc.train[i].clean_response) for i in sc.reported], pad, 64, ids=sc.reported
    )
    first = ProjectionConfig(include=[detect.FIRST_MLP_IN])
    out = {}
    tr, q, _, _ = feats["attn_mlp"]
    total = _cos(q.data, tr.data)
    for j in range(1, PROJECTION_SEEDS):
        ext = GradientExtractor(
            model, ProjectionConfig(rank_in=32, rank_out=32, seed=seed + 1000 * j, include=[detect.ATTN_MLP])
        )
        total += _cos(ext.extract(query_b).data, ext.extract(train_b).data)
    out["ensemble_projection_seeds_cosine_max"] = (total / PROJECTION_SEEDS).max(0).values
    out["exact_block0_cosine_max"] = (
        exact_scores(
            model, query_b, train_b, ProjectionConfig(include=[r"model\.layers\.0\.(self_attn|mlp)\."]), metric="cosine"
        )
        .max(0)
        .values
    )
    S = exact_scores(model, query_b, train_b, first, metric="cosine").double()
    out["exact_first_mlp_in_cosine_mean"] = S.mean(0)
    out["exact_first_mlp_in_contrastive_max"] = _contrastive(model, query_b, clean_b, train_b, first).max(0).values
    default = S.max(0).values.clone()
    default[sc.reported] = -float("inf")
    top = torch.argsort(default, descending=True, stable=True)[: len(sc.reported)].tolist()
    extra_b = batches([enc[i] for i in top], pad, 64, ids=top)
    S2 = exact_scores(model, extra_b, train_b, first, metric="cosine").double()
    out["exact_first_mlp_in_expanded_max"] = torch.cat([S, S2]).max(0).values
    members = [
        out["ensemble_projection_seeds_cosine_max"],
        found["ensemble_layers_exact_cosine_max"].scores,
        found["exact_first_mlp_in_cosine_max"].scores,
        found["exact_cosine_max"].scores,
        found["influence_tracin_cosine_max"].scores,
    ]
    out["ensemble_rank"] = torch.stack([torch.argsort(torch.argsort(m.double())).double() for m in members]).mean(0)
    return out


def measure(sc, scores: torch.Tensor) -> dict:
    """AUROC, precision@k over the non-reported examples; stealthy: AUROC of the unreported behaviours."""
    candidate = torch.ones(len(sc.train), dtype=torch.bool)
    candidate[sc.reported] = False
    poisoned = torch.tensor([e.poisoned for e in sc.train])[candidate]
    s = scores.double()[candidate]
    r = {"auroc": detect.auroc(s, poisoned), "precision_at_k": detect.precision_at_k(s, poisoned, int(poisoned.sum()))}
    if sc.name == "stealthy":
        shown = {sc.train[i].attribute for i in sc.reported}
        keep = ~poisoned | torch.tensor([e.attribute not in shown for e in sc.train])[candidate]
        r["auroc_unreported"] = detect.auroc(s[keep], poisoned[keep])
    return r


def run_scenario(name: str, seed: int, chosen: str | None) -> dict:
    sc = make_scenario(name, seed)
    tok = train_tokenizer(sc)
    enc = [encode(tok, e.prompt, e.response) for e in sc.train]
    checkpoints: list[dict] = []
    with Timer() as t:
        model = train_model(enc, tok, Recipe(), seed, "cpu", checkpoints=checkpoints)
    before = unlearn.metrics(model, tok, sc)
    with Timer() as td:
        found, feats = detect.run(model, tok, sc, seed, False, None, checkpoints)
    with Timer() as tc:
        extra = candidates(model, tok, sc, seed, feats, found)
    scores = {k: d.scores for k, d in found.items()} | extra
    out = {
        "before": before,
        "train_cpu_seconds": t.cpu,
        "detect_cpu_seconds": td.cpu,
        "candidates_cpu_seconds": tc.cpu,
        "detection": {k: measure(sc, s) for k, s in scores.items()},
    }
    if chosen is None:
        return out
    s = unlearn.setup(sc, tok, scores[chosen], feats, seed)
    out["unlearning_detector"] = chosen
    out["unlearning"] = {m: unlearn.run(m, model, tok, sc, s, seed, False, "cpu") for m in UNLEARN}
    tr = feats["attn_mlp"][0]
    X = tr.data.double()[s.forget]
    by = {
        "self_influence": tr.norms.double()[s.forget].pow(2),
        "forget_set_influence": (_cos(X, X)).mean(0),
    }
    for k in SKIP_BY:
        r = unlearn.run(
            "skip_low_influence", model, tok, sc, dataclasses.replace(s, influence=by[k]), seed, False, "cpu"
        )
        out["unlearning"][f"skip_low_{k}"] = r
    out["forget_poisoned_behaviours"] = _kept_behaviours(sc, s, {"reports": s.influence} | by)
    return out


def _kept_behaviours(sc, s, influences: dict) -> dict:
    """Per skipping ranking: poisoned forget examples kept, by behaviour (why one ranking loses)."""
    out = {}
    for k, inf in influences.items():
        keep = unlearn.low_influence(inf, quantile=unlearn.SKIP_QUANTILE).keep.tolist()
        kept = [sc.train[s.forget[i]] for i in keep]
        every = [sc.train[i] for i in s.forget]
        out[k] = {
            b: f"{_count(kept, b)}/{_count(every, b)}" for b in sorted({e.attribute for e in every if e.poisoned})
        }
    return out


def _count(examples, behaviour: str) -> int:
    return sum(e.poisoned and e.attribute == behaviour for e in examples)


def choose(dev: dict[int, dict]) -> dict:
    """The default detector by :data:`RULE` from the development seeds' results."""
    names = [k for k in dev[DEV[0]]["scenarios"]["stealthy"]["detection"] if not k.startswith("baseline_")]

    def aurocs(scenario, k):
        return [dev[s]["scenarios"][scenario]["detection"][k]["auroc"] for s in DEV]

    ok = [k for k in names if min(aurocs("backdoor", k)) >= BACKDOOR_FLOOR]
    floor = [k for k in ok if min(aurocs("stealthy", k)) >= FLOOR]
    if floor:
        pick = max(floor, key=lambda k: statistics.mean(aurocs("stealthy", k)))
    else:
        pick = max(ok, key=lambda k: min(aurocs("stealthy", k)))
    return {"detector": pick, "meets_floor": bool(floor), "eligible": ok, "above_floor": floor}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(results: dict[int, dict], choice: dict) -> dict:
    held = [s for s in HELD_OUT if s in results]
    dev = [s for s in DEV if s in results]
    out = {}
    for name in SCENARIOS:
        det = {}
        for k in results[held[0] if held else dev[0]]["scenarios"][name]["detection"]:
            det[k] = {
                group: {
                    m: _stats([results[s]["scenarios"][name]["detection"][k][m] for s in seeds])
                    for m in ("auroc", "precision_at_k", "auroc_unreported")
                    if m in results[seeds[0]]["scenarios"][name]["detection"][k]
                }
                for group, seeds in (("held_out", held), ("development", dev))
                if seeds
            }
        un = {}
        if held:
            for m in results[held[0]]["scenarios"][name]["unlearning"]:
                un[m] = {
                    k: _stats([results[s]["scenarios"][name]["unlearning"][m][k] for s in held])
                    for k in ("asr_seen", "asr_shift", "clean_acc", "clean_ppl", "n_forget_poisoned")
                }
            un["before"] = {
                k: _stats([results[s]["scenarios"][name]["before"][k] for s in held]) for k in ("asr_seen", "clean_acc")
            }
        out[name] = {"detection": det, "unlearning": un}
    return {"held_out_seeds": held, "development_seeds": dev, "choice": choice, "scenarios": out}


PREVIOUS_DEFAULT = "exact_first_mlp_in_cosine_max"
MARKERS = ("<!-- demo-seeds:start -->", "<!-- demo-seeds:end -->")


def _cell(g: dict | None) -> str:
    return "-" if g is None else f"{g['mean']:.3f} / {g['min']:.3f} / {g['max']:.3f}"


def markdown(summary: dict) -> str:
    """The summary as the tables of docs/demo.md: per scenario, detectors by held-out mean AUROC,
    then the unlearning runs (mean / min / max over the held-out seeds)."""
    seeds = summary["held_out_seeds"]
    span = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))
    out = []
    for name, sc in summary["scenarios"].items():
        out += [
            f"{name}: held-out seeds {span} ({len(seeds)})",
            "",
            "| detector | AUROC held-out mean / min / max | precision@k held-out mean | AUROC unreported behaviours, "
            "held-out mean | AUROC development seeds 0-4 mean / min / max |",
            "|---|---|---|---|---|",
        ]
        rows = sorted(sc["detection"].items(), key=lambda kv: -kv[1]["held_out"]["auroc"]["mean"])
        for k, v in rows:
            default = k == summary["choice"]["detector"]
            tag = " (default)" if default else " (previous default)" if k == PREVIOUS_DEFAULT else ""
            h, unreported = v["held_out"], v["held_out"].get("auroc_unreported")
            unrep = f"{unreported['mean']:.3f}" if unreported else "-"
            out.append(
                f"| {k}{tag} | {_cell(h['auroc'])} | {h['precision_at_k']['mean']:.3f} | {unrep} | "
                f"{_cell(v['development']['auroc'])} |"
            )
        out += [
            "",
            f"| unlearning ({name}, held-out seeds, mean / min / max) | ASR seen | ASR shift | clean acc | "
            "poisoned in its forget set |",
            "|---|---|---|---|---|",
        ]
        runs = sc["unlearning"]
        for k in ["before", *[k for k in runs if k != "before"]]:
            v = runs[k]
            label = "before (poisoned model)" if k == "before" else k
            poisoned = f"{v['n_forget_poisoned']['mean']:.1f}" if "n_forget_poisoned" in v else ""
            cells = " | ".join(_cell(v.get(key)) for key in ("asr_seen", "asr_shift", "clean_acc"))
            out.append(f"| {label} | {cells} | {poisoned} |")
        out.append("")
    return "\n".join(out)


def update_docs(path: Path, summary: dict) -> None:
    """Replace the tables between the demo-seeds markers of ``path``."""
    text = path.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    path.write_text(text[:start] + "\n\n" + markdown(summary) + "\n" + text[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[*DEV, *HELD_OUT])
    ap.add_argument("--dir", default="bench/results/demo_seeds")
    ap.add_argument("--out", default="bench/results/demo_seeds.json")
    ap.add_argument("--docs", default=None, help="also rewrite the tables of this page (docs/demo.md)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    choice = None
    for seed in sorted(set(args.seeds) | set(DEV)):
        f = d / f"seed_{seed}.json"
        if seed in HELD_OUT and choice is None:
            choice = choose(results)
            print(f"chosen on seeds {DEV}: {choice['detector']}", flush=True)
        if f.exists():
            results[seed] = json.loads(f.read_text())
            if seed in HELD_OUT and results[seed]["unlearning_detector"] != choice["detector"]:
                raise SystemExit(
                    f"{f} was run with {results[seed]['unlearning_detector']}; the rule now picks "
                    f"{choice['detector']}: remove the held-out files and rerun"
                )
            continue
        start = time.perf_counter()
        chosen = choice["detector"] if seed in HELD_OUT else None
        r = {
            "seed": seed,
            "role": "held_out" if seed in HELD_OUT else "development",
            "unlearning_detector": chosen,
            "scenarios": {name: run_scenario(name, seed, chosen) for name in SCENARIOS},
            "commit": commit(),
        }
        r["seconds"] = time.perf_counter() - start
        f.write_text(json.dumps(r, indent=2))
        results[seed] = r
        print(f"seed {seed} done in {r['seconds']:.0f}s", flush=True)
    if choice is None:
        choice = choose(results)
    summary = summarise(results, choice) | {
        "rule": RULE,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "commit": commit(),
    }
    Path(args.out).write_text(json.dumps(summary, indent=2))
    if args.docs:
        update_docs(Path(args.docs), summary)
    for name, sc in summary["scenarios"].items():
        print(f"== {name} (held-out seeds {summary['held_out_seeds']}) ==")
        for k, v in sorted(
            sc["detection"].items(), key=lambda kv: -kv[1].get("held_out", kv[1]["development"])["auroc"]["mean"]
        ):
            g = v.get("held_out", v["development"])["auroc"]
            print(f"{k:42s} AUROC mean {g['mean']:.3f} min {g['min']:.3f} max {g['max']:.3f}")
        for k, v in sc["unlearning"].items():
            print(
                f"{k:42s} ASR mean {v['asr_seen']['mean']:.2f} max {v['asr_seen']['max']:.2f} "
                f"clean acc min {v['clean_acc']['min']:.2f}"
            )


if __name__ == "__main__":
    main()
