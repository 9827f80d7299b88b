"""Which detector finds the demo's stealthy backdoor: every setting over data seeds and projection seeds.

The demo's ``stealthy`` scenario (see ``fastinfluence/demo/data.py``): the model is trained with
the demo's recipe, keeping the weights at 6 evenly spaced epochs (the last = the final model),
and each setting ranks the train examples against the 15 reports (two of the four behaviours).
Projected settings are repeated over projection seeds, because the projection moves AUROC by
more than the differences between settings; a setting is only worth a default if it holds over
both the projection seeds and the data seeds.

    python bench/demo_detector_study.py [--seeds 0 1 --projection-seeds 0 1 2 \\
        --out bench/results/demo_detector_study.json]

Settings (all cosine over the attention+MLP Linear layers at 32x32 unless named otherwise;
``max`` / ``mean``: aggregation over the reports):

- ``final_max`` / ``final_mean``: the final model (``final_max``: the demo's default before
  ``exact_first_mlp_in_max``);
- ``centred_max``: the mean train feature subtracted from train and query features first;
- ``layer_unit_max``: each layer's block unit-normalised before concatenation (equal layer weights);
- ``kfac_max``: K-FAC preconditioned cosine;
- ``contrastive_max``: query = feature(report) - feature(report with its clean answer), the gradient
  of the measurement "how much more the model prefers the reported wrong answer than the right one";
- ``token_mean``: per-token features; a report and a train example score the best pair of their
  tokens, averaged over the reports;
- ``tracin_max`` / ``tracin_mean``: cosine averaged over the 6 checkpoints (TracIn-CP, equal weights);
- ``exact_final_max``: exact (unprojected) gradients of the final model (no projection seed);
- ``exact_first_mlp_in_max``: exact gradients of the first block's MLP input layers (gate, up)
  only, the demo's default (``fastinfluence.demo.detect.FIRST_MLP_IN``).

Each setting also records ``auroc_unreported``: poisoned examples of the behaviours no report
shows against every clean example (does the ranking reach past what the reports show?).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import commit

from fastinfluence import GradientExtractor, ProjectionConfig, exact_scores, score
from fastinfluence.demo.data import batches, encode, make_scenario, train_tokenizer
from fastinfluence.demo.detect import ATTN_MLP, FIRST_MLP_IN, auroc, precision_at_k
from fastinfluence.demo.model import N_CHECKPOINTS, Recipe, build_model, train_model


def _cos(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return F.normalize(Q.double(), dim=1) @ F.normalize(X.double(), dim=1).T


def _layer_unit(M: torch.Tensor, layout) -> torch.Tensor:
    return torch.cat([F.normalize(M[:, s.start : s.stop].double(), dim=1) for s in layout.values()], 1)


def _token_best_pair(q, tr) -> torch.Tensor:
    """(Q, N): max over (query token, train token) pairs of the per-token feature cosine,
    phi_t = g_t a_t^T per layer, concatenated over layers."""
    dot = nq = nt = 0
    for n in tr.layout:
        aq, gq, at, gt = (x.double() for x in (q.tokens.a[n], q.tokens.g[n], tr.tokens.a[n], tr.tokens.g[n]))
        dot = dot + (gq @ gt.T) * (aq @ at.T)
        nq = nq + gq.pow(2).sum(1) * aq.pow(2).sum(1)
        nt = nt + gt.pow(2).sum(1) * at.pow(2).sum(1)
    C = dot / (nq.sqrt()[:, None] * nt.sqrt()[None, :]).clamp_min(1e-300)
    qo, to = q.tokens.offsets.tolist(), tr.tokens.offsets.tolist()
    per_q = torch.stack([C[qo[j] : qo[j + 1]].max(0).values for j in range(len(qo) - 1)])
    return torch.stack([per_q[:, to[i] : to[i + 1]].max(1).values for i in range(len(to) - 1)], 1)


def study(seed: int, projection_seeds: list[int]) -> dict:
    sc = make_scenario("stealthy", seed)
    tok = train_tokenizer(sc)
    enc = [encode(tok, e.prompt, e.response) for e in sc.train]
    pad = tok.pad_token_id
    train_b = batches(enc, pad, 64)
    query_b = batches([enc[i] for i in sc.reported], pad, 64, ids=sc.reported)
    clean_b = batches(
        [encode(tok, sc.train[i].prompt, sc.train[i].clean_response) for i in sc.reported], pad, 64, ids=sc.reported
    )
    checkpoints: list[dict] = []
    model = train_model(enc, tok, Recipe(), seed, "cpu", checkpoints=checkpoints)
    positive_all = torch.tensor([e.poisoned for e in sc.train])
    candidate = torch.ones(len(sc.train), dtype=torch.bool)
    candidate[sc.reported] = False
    positive = positive_all[candidate]
    k = int(positive.sum())
    shown = {sc.train[i].attribute for i in sc.reported}
    # the poisoned examples of behaviours no report shows, against every clean example
    unshown = torch.tensor([e.attribute not in shown for e in sc.train])[candidate]
    keep_unshown = ~positive | unshown
    out: dict[str, list] = {}

    def add(name: str, S: torch.Tensor, agg: str = "max"):
        s = (S.max(0).values if agg == "max" else S.mean(0)).double()[candidate]
        out.setdefault(name, []).append(
            {
                "auroc": auroc(s, positive),
                "precision_at_k": precision_at_k(s, positive, k),
                "auroc_unreported": auroc(s[keep_unshown], positive[keep_unshown]),
            }
        )

    exact = exact_scores(model, query_b, train_b, ProjectionConfig(include=[ATTN_MLP]), metric="cosine")
    add("exact_final_max", exact)
    first = exact_scores(model, query_b, train_b, ProjectionConfig(include=[FIRST_MLP_IN]), metric="cosine")
    add("exact_first_mlp_in_max", first)
    for ps in projection_seeds:
        config = ProjectionConfig(rank_in=32, rank_out=32, seed=ps, include=[ATTN_MLP])
        ext = GradientExtractor(model, config)
        tr, q = ext.extract(train_b, tokens=True, covariances=True), ext.extract(query_b, tokens=True)
        qc = ext.extract(clean_b)
        X, Q = tr.data.double(), q.data.double()
        final = _cos(Q, X)
        add("final_max", final)
        add("final_mean", final, "mean")
        mu = X.mean(0)
        add("centred_max", _cos(Q - mu, X - mu))
        add("layer_unit_max", _cos(_layer_unit(Q, tr.layout), _layer_unit(X, tr.layout)))
        kfac = score(q, tr, metric="cosine", precondition="kfac", topk=1, matrix=True).matrix
        add("kfac_max", torch.as_tensor(kfac))
        add("contrastive_max", _cos(Q - qc.data.double(), X))
        add("token_mean", _token_best_pair(q, tr), "mean")
        tracin = final.clone()
        snapshot = build_model(len(tok), Recipe(), seed, pad, tok.eos_token_id)
        for state in checkpoints[:-1]:
            snapshot.load_state_dict(state)
            e = GradientExtractor(snapshot.eval(), config)
            tracin += _cos(e.extract(query_b).data, e.extract(train_b).data)
        tracin /= len(checkpoints)
        add("tracin_max", tracin)
        add("tracin_mean", tracin, "mean")
        print(f"seed {seed} projection seed {ps} done", flush=True)
    return {
        name: {
            "auroc": [r["auroc"] for r in runs],
            "precision_at_k": [r["precision_at_k"] for r in runs],
            "auroc_mean": sum(r["auroc"] for r in runs) / len(runs),
            "precision_at_k_mean": sum(r["precision_at_k"] for r in runs) / len(runs),
            "auroc_unreported_mean": sum(r["auroc_unreported"] for r in runs) / len(runs),
        }
        for name, runs in out.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--projection-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="bench/results/demo_detector_study.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = {
        "benchmark": "demo stealthy detector study",
        "scenario": "stealthy",
        "n_checkpoints": N_CHECKPOINTS,
        "projection_seeds": args.projection_seeds,
        "seeds": {str(s): study(s, args.projection_seeds) for s in args.seeds},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "commit": commit(),
    }
    result["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(result, indent=2))
    names = list(next(iter(result["seeds"].values())))
    print(f"{'setting':18s}" + "".join(f" | seed {s}: AUROC (p@k)" for s in result["seeds"]))
    for n in names:
        cells = [f"{r[n]['auroc_mean']:.3f} ({r[n]['precision_at_k_mean']:.3f})" for r in result["seeds"].values()]
        print(f"{n:18s}" + "".join(f" | {c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
