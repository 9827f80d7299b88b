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

Added after the held-out seeds of the first round were run (so measured on seeds 0-4 first, and on
the held-out seeds only if the rule picks one of them):

- ``token_first_mlp_in_cosine_maxpos``: per-token scores (``fastinfluence.token_scores``, exact
  per-token factors of the default's layers): each train token's share of the example's cosine with
  a report, and the example scored by its strongest single token (max over tokens and reports), so
  that the position where the trigger is read counts alone instead of being diluted by the answer's
  tokens; no position is chosen by hand (the trigger is not known to the detector);
- ``ensemble_rank_contrastive_layers``: mean rank of the contrastive and the layer-ensemble detectors
  (different errors: the contrast removes the shared answer text, the layers average the scales);
- ``ensemble_rank_three``: mean rank of those two and the previous default.

Third round (after the second lost on seed 2):

- ``token_first_mlp_in_prompt_cosine_max``: per-token factors of the default's layers summed over the
  prompt's positions only, for the reports and the train examples alike (the trigger is read in the
  prompt; the answer's positions carry each behaviour's own wrong value, which the unreported
  behaviours do not share with the reports), cosine, max over the reports.

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

from fastinfluence import GradientExtractor, ProjectionConfig, exact_scores, token_scores
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
    out["ensemble_rank"] = _rank_mean(members)
    out["token_first_mlp_in_cosine_maxpos"] = _token_maxpos(model, query_b, train_b)
    out["token_first_mlp_in_prompt_cosine_max"] = _prompt_cosine(model, enc, sc.reported, query_b, train_b)
    layers = found["ensemble_layers_exact_cosine_max"].scores
    out["ensemble_rank_contrastive_layers"] = _rank_mean([out["exact_first_mlp_in_contrastive_max"], layers])
    out["ensemble_rank_three"] = _rank_mean(
        [out["exact_first_mlp_in_contrastive_max"], layers, found["exact_first_mlp_in_cosine_max"].scores]
    )
    return out


def _rank_mean(members: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the detectors of each example's rank (0 = least suspicious)."""
    return torch.stack([torch.argsort(torch.argsort(m.double())).double() for m in members]).mean(0)


def _prompt_gradients(model, batch_list, enc_rows) -> torch.Tensor:
    """(N, D) exact gradients of the first MLP's input layers summed over the prompt's positions only
    (sum_t g_t a_t^T for t in the prompt), from the per-token factors (identity projection)."""
    w = model.config.hidden_size
    config = ProjectionConfig(rank_in=w, rank_out=model.config.intermediate_size, include=[detect.FIRST_MLP_IN])
    f = GradientExtractor(model, config).extract(batch_list, tokens=True)
    rows = []
    for i, e in enumerate(enc_rows):
        n_prompt = next(t for t, label in enumerate(e["labels"]) if label != -100)
        a, g = f.token_factors(i)
        rows.append(torch.cat([(g[n][:n_prompt].double().T @ a[n][:n_prompt].double()).flatten() for n in sorted(a)]))
    return torch.stack(rows)


def _prompt_cosine(model, enc, reported, query_b, train_b) -> torch.Tensor:
    """(N,) max over the reports of the cosine of prompt-position gradients (:func:`_prompt_gradients`)."""
    q = _prompt_gradients(model, query_b, [enc[i] for i in reported])
    return _cos(q, _prompt_gradients(model, train_b, enc)).max(0).values


def _token_maxpos(model, query_b, train_b) -> torch.Tensor:
    """(N,) max over reports and train tokens of the token's share of the exact cosine on the first
    MLP's input layers (rank = the layers' widths: the projection is the identity)."""
    w = model.config.hidden_size
    config = ProjectionConfig(rank_in=w, rank_out=model.config.intermediate_size, include=[detect.FIRST_MLP_IN])
    ext = GradientExtractor(model, config)
    q, tr = ext.extract(query_b), ext.extract(train_b, tokens=True)
    per = token_scores(q, tr, rows=range(len(tr)), metric="cosine")
    return torch.stack([s.double().max() for s in per])


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


def _merge_round2(result: dict, folder: Path) -> None:
    """Add the second round's candidates (``bench/demo_seeds_round2.py``, same seed, same model) to a
    development seed's detectors; a detector already there is kept."""
    for name, sc in result["scenarios"].items():
        f = folder / f"seed_{result['seed']}_{name}.json"
        if f.exists():
            for k, v in json.loads(f.read_text())["detection"].items():
                sc["detection"].setdefault(k, v)


def choose(dev: dict[int, dict]) -> dict:
    """The default detector by :data:`RULE` from the development seeds' results. A detector measured on
    only some of them (a later round stopped early) cannot be chosen; it is listed as ``incomplete``,
    and refused unless its minimum so far (an upper bound of its minimum) is below the chosen one's
    (else only running it on every development seed can decide)."""

    def have(k):
        return all(k in dev[s]["scenarios"][sc]["detection"] for s in DEV for sc in SCENARIOS)

    every = dict.fromkeys(
        k for s in DEV for k in dev[s]["scenarios"]["stealthy"]["detection"] if not k.startswith("baseline_")
    )
    names = [k for k in every if have(k)]
    incomplete = [k for k in every if not have(k)]

    def aurocs(scenario, k):
        d = [dev[s]["scenarios"][scenario]["detection"] for s in DEV]
        return [x[k]["auroc"] for x in d if k in x]

    ok = [k for k in names if min(aurocs("backdoor", k)) >= BACKDOOR_FLOOR]
    floor = [k for k in ok if min(aurocs("stealthy", k)) >= FLOOR]
    if floor:
        pick = max(floor, key=lambda k: statistics.mean(aurocs("stealthy", k)))
    else:
        pick = max(ok, key=lambda k: min(aurocs("stealthy", k)))
    undecided = [k for k in incomplete if min(aurocs("stealthy", k)) >= min(aurocs("stealthy", pick))]
    if undecided:
        raise SystemExit(f"run {undecided} on every development seed: the rule cannot decide without them")
    return {
        "detector": pick,
        "meets_floor": bool(floor),
        "eligible": ok,
        "above_floor": floor,
        "incomplete": incomplete,
    }


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(results: dict[int, dict], choice: dict) -> dict:
    held = [s for s in HELD_OUT if s in results]
    dev = [s for s in DEV if s in results]
    out = {}
    for name in SCENARIOS:
        det = {}
        keys = dict.fromkeys(k for s in held + dev for k in results[s]["scenarios"][name]["detection"])
        for k in keys:
            det[k] = {}
            for group, seeds in (("held_out", held), ("development", dev)):
                have = [s for s in seeds if k in results[s]["scenarios"][name]["detection"]]
                if have:
                    det[k][group] = {
                        m: _stats([results[s]["scenarios"][name]["detection"][k][m] for s in have])
                        for m in ("auroc", "precision_at_k", "auroc_unreported")
                        if m in results[have[0]]["scenarios"][name]["detection"][k]
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


def _dev_cell(v: dict, summary: dict) -> str:
    """Development mean / min / max, with the seeds counted where a later round stopped early."""
    g = v["development"]["auroc"]
    return _cell(g) + ("" if g["n"] == len(summary["development_seeds"]) else f" ({g['n']} seeds)")


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
        # detectors run on the held-out seeds by held-out mean, then those only on the development seeds
        rows = sorted(
            sc["detection"].items(),
            key=lambda kv: ("held_out" not in kv[1], -kv[1].get("held_out", kv[1]["development"])["auroc"]["mean"]),
        )
        for k, v in rows:
            default = k == summary["choice"]["detector"]
            tag = " (default)" if default else " (previous default)" if k == PREVIOUS_DEFAULT else ""
            if "held_out" not in v:
                out.append(f"| {k}{tag} | not run (later round, not chosen) | - | - | {_dev_cell(v, summary)} |")
                continue
            h, unreported = v["held_out"], v["held_out"].get("auroc_unreported")
            unrep = f"{unreported['mean']:.3f}" if unreported else "-"
            out.append(
                f"| {k}{tag} | {_cell(h['auroc'])} | {h['precision_at_k']['mean']:.3f} | {unrep} | "
                f"{_dev_cell(v, summary)} |"
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


def plot(results: dict[int, dict], summary: dict, path: Path) -> None:
    """docs/demo_detection.png: per scenario, one row per detector (ordered by held-out stealthy mean
    AUROC, the same order in both panels), one dot per held-out seed at its AUROC, each seed on its own
    height inside the row so that equal values (AUROC 1.000 in backdoor) stay ten dots, not one; the
    held-out mean as a bar, the development mean as an open square; the default's row shaded and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held, chosen = summary["held_out_seeds"], summary["choice"]["detector"]
    stealthy = summary["scenarios"]["stealthy"]["detection"]
    ran = [k for k in stealthy if "held_out" in stealthy[k]]  # run on the held-out seeds
    order = sorted(ran, key=lambda k: stealthy[k]["held_out"]["auroc"]["mean"])  # best at the top
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 0.36 * len(order) + 2.0), sharey=True, gridspec_kw={"width_ratios": [1, 1.7]}
    )
    bounds = {"backdoor": [(0.95, "bound 0.95")], "stealthy": [(0.70, "bound 0.70 (lowered)"), (0.90, "target 0.90")]}
    for ax, name in zip(axes, SCENARIOS):
        det = summary["scenarios"][name]["detection"]
        for y, k in enumerate(order):
            base = k.startswith("baseline_")
            colour = "C1" if base else "k" if k == chosen else "C0"
            if k == chosen:
                ax.axhspan(y - 0.5, y + 0.5, color="gold", alpha=0.3, lw=0)
            values = [results[s]["scenarios"][name]["detection"][k]["auroc"] for s in held]
            dy = [0.7 * (i / max(len(held) - 1, 1) - 0.5) for i in range(len(held))]
            ax.scatter(values, [y + d for d in dy], s=12, color=colour, alpha=0.75, lw=0)
            mean = det[k]["held_out"]["auroc"]["mean"]
            ax.plot([mean] * 2, [y - 0.42, y + 0.42], color=colour, lw=2.2)
            ax.text(1.015, y, f"{mean:.3f}", fontsize=6.5, va="center", color=colour, clip_on=False)
            ax.scatter(
                [det[k]["development"]["auroc"]["mean"]],
                [y],
                s=30,
                marker="s",
                facecolors="none",
                edgecolors="C3",
                lw=1.1,
                zorder=4,
            )
        for x, label in bounds[name]:
            ax.axvline(x, color="C2" if "lowered" in label or name == "backdoor" else "grey", ls="--", lw=1)
            ax.text(x, len(order) - 0.3, label, fontsize=7, ha="center", va="bottom", color="dimgrey")
        lo = 0.6 if name == "backdoor" else 0.2
        ax.set(xlim=(lo, 1.01), ylim=(-0.6, len(order) + 0.4), xlabel="AUROC (poisoned = positive)")
        ax.set_title(f"{name} (number: held-out mean)", fontsize=9.5, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(order)))
    axes[0].set_yticklabels(
        [
            k + ("  (default)" if k == chosen else "  (previous default)" if k == PREVIOUS_DEFAULT else "")
            for k in order
        ],
        fontsize=7.5,
    )
    for t, k in zip(axes[0].get_yticklabels(), order):
        t.set_color("C1" if k.startswith("baseline_") else "k")
        t.set_fontweight("bold" if k == chosen else "normal")
    fig.suptitle(
        f"Finding the poisoned examples: one dot per held-out seed ({held[0]}-{held[-1]}, each on its own height), "
        "bar = their mean, red square = mean on the development seeds 0-4\n"
        "influence detectors blue, the default black (shaded row), trivial baselines orange",
        fontsize=9.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REPORT_MARKERS = ("<!-- demo-seed-reports:start -->", "<!-- demo-seed-reports:end -->")


def seed_reports_markdown(paths: list[Path]) -> str:
    """Tables of whole demo runs (``fastinfluence demo --seed N``'s report.json, every detector, every
    loss and retraining); a cell holds one number per run, in the order of ``paths``."""
    from fastinfluence.demo import report

    runs = [json.loads(p.read_text()) for p in paths]
    seeds = " / ".join(f"seed {r['seed']}" for r in runs)
    out = [
        f"Runs: {', '.join(f'`bench/results/{p.name}`' for p in paths)} (commit "
        f"{', '.join(sorted({r.get('commit', '?')[:7] for r in runs}))}; cells: {seeds}). "
        f"Bounds (`python -m fastinfluence.demo.report FILE`): "
        + "; ".join(
            f"seed {r['seed']}: " + ("missed: " + ", ".join(p) if (p := report.check(r, False)) else "every one holds")
            for r in runs
        )
        + ".",
        "",
    ]
    for name in runs[0]["scenarios"]:
        scs = [r["scenarios"][name] for r in runs]
        d = scs[0]["data"]
        out += [
            f"**{name}**: {d['n_train']} train examples, {d['n_poisoned']} poisoned, {d['n_reported']} reported; "
            f"poisoned in the default's forget set: {' / '.join(str(sc['data']['n_forget_poisoned']) for sc in scs)}"
            f" of {d['n_forget']}",
            "",
            "| detector | AUROC | precision@k |",
            "|---|---|---|",
        ]
        det = sorted(scs[0]["detection"], key=lambda k: -statistics.mean(sc["detection"][k]["auroc"] for sc in scs))
        for k in det:
            tag = " (default)" if k == scs[0]["default_detector"] else ""
            cells = [" / ".join(f"{sc['detection'][k][m]:.3f}" for sc in scs) for m in ("auroc", "precision_at_k")]
            out.append(f"| {k}{tag} | {cells[0]} | {cells[1]} |")
        out += [
            "",
            "| unlearning run | ASR seen | ASR shift | clean acc | clean ppl | MIA AUC | CPU s |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = [("before (poisoned model)", [sc["before"] for sc in scs])]
        for k in scs[0]["unlearning"]:
            tag = " (default)" if k == scs[0]["default_unlearning"] else ""
            rows.append((k + tag, [sc["unlearning"][k] for sc in scs]))
        rows.append(("retrain without forget set", [sc["retrain"] for sc in scs]))
        for label, rs in rows:
            cells = []
            for m, f in (
                ("asr_seen", ".2f"),
                ("asr_shift", ".2f"),
                ("clean_acc", ".2f"),
                ("clean_ppl", ".3f"),
                ("mia_auc", ".2f"),
                ("cpu_seconds", ".1f"),
            ):
                cells.append(" / ".join(format(r[m], f) for r in rs) if all(m in r for r in rs) else "")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Unlearning takes "
            + " / ".join(f"{sc['speedup']['unlearn_vs_retrain']:.1f}x" for sc in scs)
            + " less CPU time than retraining, "
            + " / ".join(f"{sc['speedup']['end_to_end_vs_retrain']:.1f}x" for sc in scs)
            + " with detection and weights.",
            "",
        ]
    return "\n".join(out)


def _replace_between(path: Path, markers: tuple[str, str], body: str) -> None:
    text = path.read_text()
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    path.write_text(text[:start] + "\n\n" + body + "\n" + text[end:])


def update_docs(path: Path, summary: dict, seed_reports: list[Path] = ()) -> None:
    """Replace the tables between the demo-seeds markers of ``path`` (and, with ``seed_reports``,
    those between the demo-seed-reports markers)."""
    _replace_between(path, MARKERS, markdown(summary))
    if seed_reports:
        _replace_between(path, REPORT_MARKERS, seed_reports_markdown(list(seed_reports)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[*DEV, *HELD_OUT])
    ap.add_argument("--dir", default="bench/results/demo_seeds")
    ap.add_argument("--out", default="bench/results/demo_seeds.json")
    ap.add_argument(
        "--round2",
        nargs="*",
        default=["bench/results/demo_seeds_round2", "bench/results/demo_seeds_round3"],
        help="second-round candidates on the development seeds (bench/demo_seeds_round2.py), read before choosing",
    )
    ap.add_argument("--docs", default=None, help="also rewrite the tables of this page (docs/demo.md)")
    ap.add_argument(
        "--seed-reports",
        nargs="*",
        default=["bench/results/demo_seed0.json"],
        help="whole demo runs (report.json of fastinfluence demo --seed N) tabled in --docs",
    )
    ap.add_argument("--plot", default=None, help="also draw the held-out AUROC per seed here (docs/demo_detection.png)")
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
            if seed in DEV:
                for folder in args.round2:
                    _merge_round2(results[seed], Path(folder))
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
        if seed in DEV:
            for folder in args.round2:
                _merge_round2(r, Path(folder))
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
        update_docs(Path(args.docs), summary, [Path(p) for p in args.seed_reports])
    if args.plot:
        plot(results, summary, Path(args.plot))
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
