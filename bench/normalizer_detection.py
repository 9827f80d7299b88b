"""Detection AUROC with optimizer-aware normalisation (TrackStar) on the demo's scenarios.

For each scenario (``backdoor``, ``stealthy``) the demo's own data, tokenizer and training
(``fastinfluence.demo``) give the poisoned model; the AdamW optimizer the demo trains with is
kept (its ``exp_avg_sq`` is the Adam normaliser). Queries are the reported poisoned examples,
candidates every other train example, as in the demo's detection. For each projection seed,
each normaliser

    none            the demo's features (identity)
    fitted          Normalizer.fit on the train data (TrackStar's statistics from gradients)
    fitted_d0.1     the same with damping_ratio=0.1
    adam            Normalizer.from_optimizer on the trained model's AdamW state

is crossed with the detectors (the demo default ``cosine_max``, ``cosine_mean``, ``dot_mean``,
and the K-FAC / EK-FAC preconditioners on the query side with dot and cosine), and the exact
(unprojected) cosine of normalised gradients is added once per normaliser.
``kfac_whitened_cosine_max`` is TrackStar's order with a curvature term: both sides whitened
by the projected K-FAC factors, (C_G + l)^-1/2 phi (C_A + l)^-1/2, then unit-normalised (the
library's ``cosine`` with a preconditioner divides the train side by its raw norm instead). Data and model
seeds (``--model-seeds``; the demo's is 0) each train a model; a summary gives the mean,
min and max AUROC over every (model seed, projection seed).

    nice -n 10 .venv/bin/python bench/normalizer_detection.py     # ~8 CPU minutes (2 data/model seeds)
    -> bench/results/normalizer_detection_cpu.json

Trained models and their optimizer states are cached under runs/bench_normalizer/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import commit, interleaved_medians  # noqa: E402

from fastinfluence import GradientExtractor, Normalizer, ProjectionConfig, exact_scores, score  # noqa: E402
from fastinfluence.demo import detect  # noqa: E402
from fastinfluence.demo import model as demo_model  # noqa: E402
from fastinfluence.demo.data import batches, encode, make_scenario, train_tokenizer  # noqa: E402
from fastinfluence.precondition import fit  # noqa: E402

DETECTORS = {  # name -> (metric, precondition, aggregate)
    "cosine_max": ("cosine", None, "max"),
    "cosine_mean": ("cosine", None, "mean"),
    "dot_mean": ("dot", None, "mean"),
    "kfac_dot_mean": ("dot", "kfac", "mean"),
    "ekfac_dot_mean": ("dot", "ekfac", "mean"),
    "kfac_cosine_max": ("cosine", "kfac", "max"),
    "ekfac_cosine_max": ("cosine", "ekfac", "max"),
}


def _inverse_sqrt(M: torch.Tensor, ratio: float = 0.1) -> torch.Tensor:
    """(M + ratio x mean eigenvalue)^-1/2, the damping the library's kfac uses."""
    e, Q = torch.linalg.eigh(M)
    return Q @ torch.diag((e + ratio * e.mean()).rsqrt()) @ Q.T


def whitened_cosine(q, train) -> torch.Tensor:
    """(Q, N) cosines of both sides whitened by the projected K-FAC factors fitted on ``train``."""
    stats = fit(train, "kfac").stats

    def whiten(x):
        out = x.double().clone()
        for name, sl in train.layout.items():
            G, A = _inverse_sqrt(stats[f"{name}.C_G"]), _inverse_sqrt(stats[f"{name}.C_A"])
            P = out[:, sl.start : sl.stop].reshape(-1, *sl.shape)
            out[:, sl.start : sl.stop] = (G @ P @ A).reshape(len(out), -1)
        return torch.nn.functional.normalize(out, dim=1)

    return whiten(q.data) @ whiten(train.data).T


def trained(name: str, seed: int, cache: Path):
    """The demo's model for a scenario and the state of the AdamW it was trained with (cached)."""
    scenario = make_scenario(name, seed)
    tokenizer = train_tokenizer(scenario)
    enc = [encode(tokenizer, e.prompt, e.response) for e in scenario.train]
    recipe = demo_model.Recipe()
    path = cache / f"{name}_s{seed}.pt"
    model = demo_model.build_model(len(tokenizer), recipe, seed, tokenizer.pad_token_id, tokenizer.eos_token_id)
    if path.exists():
        saved = torch.load(path, weights_only=True)  # tensors and plain values only: no pickle code runs
        model.load_state_dict(saved["model"])
        return scenario, tokenizer, enc, model.eval(), saved["optimizer"], saved["train_seconds"]
    made = []

    class KeptAdamW(torch.optim.AdamW):  # the demo builds its optimizer inside train_model: keep it
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    adamw, torch.optim.AdamW = torch.optim.AdamW, KeptAdamW
    try:
        start = time.perf_counter()
        model = demo_model.train_model(enc, tokenizer, recipe, seed, "cpu")
        seconds = time.perf_counter() - start
    finally:
        torch.optim.AdamW = adamw
    (optimizer,) = made
    # named, so Normalizer.from_optimizer can map the state without relying on parameter order
    state = optimizer.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    for group, live in zip(state["param_groups"], optimizer.param_groups):
        group["param_names"] = [names[id(p)] for p in live["params"]]
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": state, "train_seconds": seconds}, path)
    return scenario, tokenizer, enc, model.eval(), state, seconds


def run_scenario(name: str, model_seed: int, proj_seeds: list[int], rank: int, cache: Path) -> dict:
    scenario, tokenizer, enc, model, opt_state, train_seconds = trained(name, model_seed, cache)
    pad = tokenizer.pad_token_id
    train_batches = batches(enc, pad, 64)
    query_batches = batches([enc[i] for i in scenario.reported], pad, 64, ids=scenario.reported)
    poisoned = torch.tensor([e.poisoned for e in scenario.train])
    candidate = torch.ones(len(enc), dtype=torch.bool)
    candidate[scenario.reported] = False
    positive = poisoned[candidate]

    def auc(s):
        return detect.auroc(s.double()[candidate], positive)

    layers = ProjectionConfig(include=[detect.ATTN_MLP])
    normalizers, fit_seconds = {"none": None}, {}
    for key, make in (
        ("fitted", lambda: Normalizer.fit(model, train_batches, layers)),
        ("fitted_d0.1", lambda: Normalizer.fit(model, train_batches, layers, damping_ratio=0.1)),
        ("adam", lambda: Normalizer.from_optimizer(model, opt_state, layers)),
    ):
        start = time.perf_counter()
        normalizers[key] = make()
        fit_seconds[key] = time.perf_counter() - start

    # The scales are folded into P_in / P_out: a normalised extraction should cost what a plain one does.
    cfg = ProjectionConfig(rank_in=rank, rank_out=rank, include=[detect.ATTN_MLP])
    extractors = {k: GradientExtractor(model, cfg, normalizer=normalizers[k]) for k in ("none", "adam")}
    extract_seconds = interleaved_medians({k: lambda e=e: e.extract(train_batches) for k, e in extractors.items()}, 5)

    out = {}
    for key, norm in normalizers.items():
        per_seed = {d: [] for d in (*DETECTORS, "kfac_whitened_cosine_max")}
        for seed in proj_seeds:
            cfg = ProjectionConfig(rank_in=rank, rank_out=rank, seed=seed, include=[detect.ATTN_MLP])
            ext = GradientExtractor(model, cfg, normalizer=norm)
            tr = ext.extract(train_batches, covariances=True)
            q = ext.extract(query_batches)
            for d, (metric, pre, agg) in DETECTORS.items():
                r = score(q, tr, metric=metric, precondition=pre, topk=1, aggregates=(agg,))
                per_seed[d].append(auc(r.aggregates[agg]))
            per_seed["kfac_whitened_cosine_max"].append(auc(whitened_cosine(q, tr).max(0).values))
        exact = exact_scores(model, query_batches, train_batches, layers, metric="cosine", normalizer=norm)
        out[key] = {
            "detectors": {
                d: {"auroc": v, "mean": statistics.mean(v), "min": min(v), "max": max(v)} for d, v in per_seed.items()
            },
            "exact_cosine_max": auc(exact.max(0).values),
            "fit_seconds": fit_seconds.get(key, 0.0),
        }
        print(name, key, {d: round(statistics.mean(v), 3) for d, v in per_seed.items()}, flush=True)
    return {
        "n_train": len(enc),
        "n_poisoned": int(poisoned.sum()),
        "n_reported": len(scenario.reported),
        "model_seed": model_seed,
        "train_seconds": train_seconds,
        "extract_train_seconds_median_of_5": extract_seconds,
        "normalizers": out,
    }


def summary(runs: dict) -> dict:
    """Per normaliser and detector: mean, min and max AUROC over every (model seed, projection seed)."""
    out = {}
    for key in next(iter(runs.values()))["normalizers"]:
        out[key] = {}
        for d in (*DETECTORS, "kfac_whitened_cosine_max"):
            v = [a for r in runs.values() for a in r["normalizers"][key]["detectors"][d]["auroc"]]
            out[key][d] = {"mean": statistics.mean(v), "min": min(v), "max": max(v), "n": len(v)}
        exact = [r["normalizers"][key]["exact_cosine_max"] for r in runs.values()]
        out[key]["exact_cosine_max"] = {"mean": statistics.mean(exact), "min": min(exact), "max": max(exact)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=["backdoor", "stealthy"])
    ap.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1], help="data + model seeds (demo: 0)")
    ap.add_argument("--proj-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rank", type=int, default=32, help="projection rank per side (the demo's: 32)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_normalizer")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "normalizer_detection_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = {
        "bench": "normalizer_detection",
        "commit": commit(),
        "torch": torch.__version__,
        "rank": args.rank,
        "proj_seeds": args.proj_seeds,
        "layers": detect.ATTN_MLP,
        "detectors": {d: {"metric": m, "precondition": p or "identity", "aggregate": a} for d, (m, p, a) in
                      DETECTORS.items()},
        "scenarios": {},
    }  # fmt: skip
    for s in args.scenarios:
        runs = {str(m): run_scenario(s, m, args.proj_seeds, args.rank, args.cache) for m in args.model_seeds}
        result["scenarios"][s] = {"summary": summary(runs), "by_model_seed": runs}
    result["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
