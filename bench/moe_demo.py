"""Poison detection on an MoE variant of the demo's model, next to the dense model, same seeds.

For each scenario (``backdoor``, ``stealthy``) and seed, the demo's data and tokenizer are made
and two models are trained the demo's way (``demo.model.train_model``, the full recipe): the
dense Llama and an MoE variant (``Recipe(experts=4)``: Mixtral blocks, 4 experts, top-2, each
expert as wide as the hidden state, so a token's MLP compute matches the dense MLP). Both are
scored by two of the demo's detectors (queries = the reported poisoned examples; AUROC and
precision@k over the other train examples, as ``demo.detect`` computes them):

- ``ensemble_layers_exact_cosine_max`` (the demo's default): exact per-layer-group cosine
  averaged over the groups (``detect.LAYER_GROUPS``, per block: attention, MLP input layers, MLP
  output layer), max over the reports. In the MoE model the MLP input group is the router and
  every expert's ``gate_up_proj``, the output group every expert's ``down_proj``: experts captured.
- ``influence_cosine_max``: projected (32 x 32) attention + MLP features (experts and routers
  included in the MoE model), cosine, max over the reports.

Resumable: each (scenario, seed, model) run is one JSON under ``--dir``; a rerun skips the runs whose
file exists, so scenarios can run in separate processes and a last call writes the summary.

    python bench/moe_demo.py [--seeds 0 1 2 --scenarios backdoor stealthy --dir DIR
                              --out bench/results/moe_demo_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from _common import commit

from fastinfluence import GradientExtractor, ProjectionConfig, exact_scores, score
from fastinfluence.demo import detect
from fastinfluence.demo.data import SCENARIOS, batches, encode, make_scenario, train_tokenizer
from fastinfluence.demo.model import Recipe, Timer, attack_success, exact_match, train_model

EXPERTS = 4


def detection(model, tok, sc, seed: int) -> dict:
    enc = [encode(tok, e.prompt, e.response) for e in sc.train]
    train_b = batches(enc, tok.pad_token_id, 64)
    query_b = batches([enc[i] for i in sc.reported], tok.pad_token_id, 64, ids=sc.reported)
    candidate = torch.ones(len(sc.train), dtype=torch.bool)
    candidate[sc.reported] = False
    positive = torch.tensor([e.poisoned for e in sc.train])[candidate]
    k = int(positive.sum())
    by_behaviour = detect.behaviour_masks(sc, candidate)
    out = {}

    def record(name, fn):
        with Timer() as t:
            s = fn().double()[candidate]
        out[name] = {
            "auroc": detect.auroc(s, positive),
            "precision_at_k": detect.precision_at_k(s, positive, k),
            "cpu_seconds": t.cpu,
        }
        if by_behaviour:
            out[name]["auroc_by_behaviour"] = {b: detect.auroc(s[m], positive[m]) for b, m in by_behaviour.items()}

    def ensemble():
        groups = [ProjectionConfig(include=[g]) for g in detect.LAYER_GROUPS]  # experts and routers in the MLP's
        S = [exact_scores(model, query_b, train_b, config, metric="cosine") for config in groups]
        return (sum(S) / len(S)).max(0).values

    def projected():
        ext = GradientExtractor(model, ProjectionConfig(rank_in=32, rank_out=32, seed=seed, include=[detect.ATTN_MLP]))
        q, tr = ext.extract(query_b), ext.extract(train_b)
        out["captured_layers"] = len(ext.layers)
        out["expert_layers"] = sum(l.routed for l in ext.layers)
        return score(q, tr, metric="cosine", topk=1, aggregates=("max",)).aggregates["max"]

    record(detect.DEFAULT, ensemble)
    record("influence_cosine_max", projected)
    return out


def run_one(name: str, seed: int, experts: int, epochs: int) -> dict:
    sc = make_scenario(name, seed)
    tok = train_tokenizer(sc)
    enc = [encode(tok, e.prompt, e.response) for e in sc.train]
    recipe = Recipe(experts=experts, epochs=epochs)
    with Timer() as t:
        model = train_model(enc, tok, recipe, seed, "cpu")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_cpu_seconds": t.cpu,
        "asr_seen": attack_success(model, tok, sc, sc.attack_seen)["all"],
        "clean_acc": exact_match(model, tok, sc.clean_eval),
        "detection": detection(model, tok, sc, seed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--epochs", type=int, default=Recipe().epochs, help="the demo's recipe unless smoke-testing")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fastinfluence_moe_demo")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_demo_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.scenarios:
        for seed in args.seeds:
            for variant, experts in (("dense", 0), ("moe", EXPERTS)):
                path = args.dir / f"{name}_{seed}_{variant}_e{args.epochs}.json"
                if not path.exists():
                    r = run_one(name, seed, experts, args.epochs)
                    path.write_text(json.dumps(r, indent=2))
                r = json.loads(path.read_text())
                runs.setdefault(name, {}).setdefault(str(seed), {})[variant] = r
                d = r["detection"]
                print(
                    f"{name} seed {seed} {variant}: ASR {r['asr_seen']:.2f}, clean acc {r['clean_acc']:.2f}, "
                    + ", ".join(f"{k} AUROC {v['auroc']:.3f}" for k, v in d.items() if isinstance(v, dict)),
                    flush=True,
                )
    summary = {
        name: {
            variant: {
                det: statistics.mean(runs[name][str(s)][variant]["detection"][det]["auroc"] for s in args.seeds)
                for det in (detect.DEFAULT, "influence_cosine_max")
            }
            for variant in ("dense", "moe")
        }
        for name in args.scenarios
    }
    result = {
        "bench": "moe_demo",
        "device": f"cpu ({platform.processor() or platform.machine()}, 1 thread, shared with other jobs)",
        "commit": commit(),
        "torch": torch.__version__,
        "moe": {"arch": "mixtral", "experts": EXPERTS, "top_k": 2, "expert_width": Recipe().hidden},
        "recipe": vars(Recipe(epochs=args.epochs)),
        "seeds": args.seeds,
        "mean_auroc": summary,
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
