"""Second round of candidate detectors for the demo, on the development seeds 0-4 only (CPU-light).

``bench/demo_seeds.py`` runs every detector and unlearning on each seed (about 85 CPU seconds a
seed on a quiet machine); this script trains the same model (same recipe, same seed, so the same
weights) and computes only what the second round's candidates need (``demo_seeds.py``'s docstring:
``token_first_mlp_in_cosine_maxpos``, ``ensemble_rank_contrastive_layers``, ``ensemble_rank_three``;
``--round 3``: ``token_first_mlp_in_prompt_cosine_max``),
plus the default, the previous default and the contrastive detector as a check that the model is the
one of the first round (their AUROC must equal the stored ones, to 1e-3: the layer ensemble is
summed in float64 here, in float32 by ``detect.run``, which moves it by 3e-5 on seed 0). One JSON per
(seed, scenario) under ``--dir``; resumable.
The rule (``demo_seeds.RULE``) is then applied to the first round's detectors and these together.

    python bench/demo_seeds_round2.py --seeds 0 1 2 3 4 --scenarios stealthy backdoor
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import commit
from demo_seeds import _contrastive, _prompt_cosine, _rank_mean, _token_maxpos, measure

from fastinfluence import ProjectionConfig, exact_scores
from fastinfluence.demo import detect
from fastinfluence.demo.data import batches, encode, make_scenario, train_tokenizer
from fastinfluence.demo.model import Recipe, Timer, train_model


def run(name: str, seed: int, round_: int) -> dict:
    sc = make_scenario(name, seed)
    tok = train_tokenizer(sc)
    pad = tok.pad_token_id
    enc = [encode(tok, e.prompt, e.response) for e in sc.train]
    with Timer() as t:
        model = train_model(enc, tok, Recipe(), seed, "cpu")
    train_b = batches(enc, pad, 64)
    query_b = batches([enc[i] for i in sc.reported], pad, 64, ids=sc.reported)
    clean_b = batches(
        [encode(tok, sc.train[i].prompt, sc.train[i].clean_response) for i in sc.reported], pad, 64, ids=sc.reported
    )
    first = ProjectionConfig(include=[detect.FIRST_MLP_IN])
    with Timer() as td:
        scores = {}
        scores["exact_first_mlp_in_cosine_max"] = (
            exact_scores(model, query_b, train_b, first, metric="cosine").double().max(0).values
        )
        layers = sum(
            exact_scores(model, query_b, train_b, ProjectionConfig(include=[g]), metric="cosine").double()
            for g in detect.LAYER_GROUPS
        ) / len(detect.LAYER_GROUPS)
        scores["ensemble_layers_exact_cosine_max"] = layers.max(0).values
        if round_ == 3:
            scores["token_first_mlp_in_prompt_cosine_max"] = _prompt_cosine(model, enc, sc.reported, query_b, train_b)
        else:
            contrastive = _contrastive(model, query_b, clean_b, train_b, first).max(0).values
            scores["exact_first_mlp_in_contrastive_max"] = contrastive
            scores["token_first_mlp_in_cosine_maxpos"] = _token_maxpos(model, query_b, train_b)
            layers = scores["ensemble_layers_exact_cosine_max"]
            scores["ensemble_rank_contrastive_layers"] = _rank_mean([contrastive, layers])
            scores["ensemble_rank_three"] = _rank_mean([contrastive, layers, scores["exact_first_mlp_in_cosine_max"]])
    return {
        "seed": seed,
        "scenario": name,
        "train_cpu_seconds": t.cpu,
        "detect_cpu_seconds": td.cpu,
        "detection": {k: measure(sc, s) for k, s in scores.items()},
        "commit": commit(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--scenarios", nargs="+", default=["stealthy", "backdoor"])
    ap.add_argument("--round", type=int, choices=(2, 3), default=2, help="which round's candidates")
    ap.add_argument("--dir", default=None, help="default bench/results/demo_seeds_round{2,3}")
    ap.add_argument("--first-round", default="bench/results/demo_seeds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(args.dir or f"bench/results/demo_seeds_round{args.round}")
    d.mkdir(parents=True, exist_ok=True)
    for name in args.scenarios:
        for seed in args.seeds:
            f = d / f"seed_{seed}_{name}.json"
            if not f.exists():
                start = time.perf_counter()
                r = run(name, seed, args.round)
                r["seconds"] = time.perf_counter() - start
                f.write_text(json.dumps(r, indent=2))
            r = json.loads(f.read_text())
            old = json.loads((Path(args.first_round) / f"seed_{seed}.json").read_text())["scenarios"][name]
            line = " ".join(f"{k} {v['auroc']:.3f}" for k, v in r["detection"].items())
            same = all(
                abs(r["detection"][k]["auroc"] - old["detection"][k]["auroc"]) < 1e-3
                for k in r["detection"]
                if k in old["detection"]
            )
            print(f"{name} seed {seed} ({'same model as round 1' if same else 'DIFFERS from round 1'}): {line}")


if __name__ == "__main__":
    main()
