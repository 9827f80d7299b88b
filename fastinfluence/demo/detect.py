"""Detection: rank the train examples by how much they look like the reported poisoned ones.

Influence settings (projected per-example gradients of the poisoned model, or of the
checkpoints kept during its training; queries = the reported examples) against trivial
baselines. Why the default is the default: ``report.DETECTOR_CHOICE``. Every detector gives one score per train
example, higher = more suspicious; the reported examples themselves are left out of the
ranking, and AUROC / precision@k are over the rest (k = number of poisoned among them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import GradientExtractor, ProjectionConfig, exact_scores, score
from ..evaluate import auc
from ..lm import model_inputs
from ..losses import sequence_nll
from .data import Scenario, batches, encode
from .model import Timer

DEFAULT = "ensemble_layers_exact_cosine_max"
ATTN_MLP = r"self_attn\.|mlp\."
# An MLP's input layers: the dense MLP's gate and up projections; in an MoE block (``Recipe(experts=N)``)
# the router and every expert's gate_up (or up) projection. Its output layers: the down projection(s).
MLP_IN = r"mlp\.((gate|up)_proj|gate|experts\.\d+\.(gate_up|up)_proj)$"
MLP_OUT = r"mlp\.(experts\.\d+\.)?down_proj$"
# The input-reading layers of the first block's MLP: where the trigger is read, the same for every
# behaviour; higher layers and the LM head write the behaviour's own wrong value.
FIRST_MLP_IN = rf"model\.layers\.0\.{MLP_IN}"
# The default's layer groups: per block, attention, the MLP input layers, the MLP output layers. Each
# group's cosine is averaged with equal weight, so no group's gradient scale decides the ranking alone.
LAYER_GROUPS = [rf"model\.layers\.{b}\.{g}" for b in (0, 1) for g in (r"self_attn\.", MLP_IN, MLP_OUT)]


@dataclass
class Detection:
    scores: torch.Tensor  # (N,) over every train example; reported ones are excluded by ``candidates``
    auroc: float
    precision_at_k: float
    seconds: float
    cpu_seconds: float
    # stealthy: AUROC of each behaviour's poisoned examples against every clean one (reported or not)
    auroc_by_behaviour: dict[str, float] | None = None


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        raise ValueError(f"AUROC needs positives and negatives, got {len(pos)} and {len(neg)}")
    return auc(pos, neg)


def behaviour_masks(scenario: Scenario, candidate: torch.Tensor) -> dict[str, torch.Tensor]:
    """stealthy: behaviour -> mask over the candidates keeping its poisoned examples and every clean
    one. A behaviour whose poisoned examples are all reports has none left to rank: left out."""
    if scenario.name != "stealthy":
        return {}
    poisoned = torch.tensor([e.poisoned for e in scenario.train])[candidate]
    out = {}
    for b in scenario.behaviours:
        m = torch.tensor([not e.poisoned or e.attribute == b for e in scenario.train])[candidate]
        if bool(poisoned[m].any()):
            out[b] = m
    return out


def precision_at_k(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    return positive[top].double().mean().item()


def _max_jaccard(sets: list[set], queries: list[set]) -> torch.Tensor:
    return torch.tensor([max(len(s & q) / max(len(s | q), 1) for q in queries) for s in sets])


@torch.no_grad()
def _last_prompt_hidden(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    out = []
    for s in range(0, len(prompts), 128):
        enc = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[s : s + 128]]
        T = max(map(len, enc))
        ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(e)) + e for e in enc], device=model.device)
        mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc], device=model.device)
        h = model.model(**model_inputs(model.model, ids, mask)).last_hidden_state[:, -1]
        out.append(torch.nn.functional.normalize(h.float(), dim=-1).cpu())
    return torch.cat(out)


def _tracin_cosine(model, checkpoints, config, train_batches, query_batches, last) -> torch.Tensor:
    """(Q, N) cosine averaged over the training checkpoints (TracIn-CP with cosine, equal weights);
    ``last``: the (train, query) Features of the final model, the last checkpoint."""
    snapshot = copy.deepcopy(model)
    total = torch.as_tensor(score(last[1], last[0], metric="cosine", topk=1, matrix=True).matrix).double()
    for state in checkpoints[:-1]:
        snapshot.load_state_dict(state)
        ext = GradientExtractor(snapshot.eval(), config)
        tr, q = ext.extract(train_batches), ext.extract(query_batches)
        total += torch.as_tensor(score(q, tr, metric="cosine", topk=1, matrix=True).matrix).double()
    return total / len(checkpoints)


def run(
    model, tokenizer, scenario: Scenario, seed: int, quick: bool, progress=None, checkpoints=None
) -> tuple[dict[str, Detection], dict]:
    """Every detector's scores and metrics (``progress.update(1)`` after each), and the features
    unlearning reuses: ``attn_mlp`` (train Features, query Features, extractor, train batches)
    and ``lm_head`` (N, D) LM-head features (IMU's gradients). ``checkpoints``: the weights
    saved during training (``model.train_model``), for the trajectory detector; None skips it."""
    train = scenario.train
    enc = [encode(tokenizer, e.prompt, e.response) for e in train]
    pad = tokenizer.pad_token_id
    train_batches = batches(enc, pad, 64)
    query_batches = batches([enc[i] for i in scenario.reported], pad, 64, ids=scenario.reported)
    is_poisoned = torch.tensor([e.poisoned for e in train])
    candidate = torch.ones(len(train), dtype=torch.bool)
    candidate[scenario.reported] = False
    positive = is_poisoned[candidate]
    k = int(positive.sum())
    by_behaviour = behaviour_masks(scenario, candidate)
    results: dict[str, Detection] = {}

    def record(name, fn, *, base_timer=None):
        with Timer() as t:
            s = fn()
        wall, cpu = t.wall + (base_timer.wall if base_timer else 0), t.cpu + (base_timer.cpu if base_timer else 0)
        s = s.double()
        c = s[candidate]
        per = {b: auroc(c[m], positive[m]) for b, m in by_behaviour.items()} or None
        results[name] = Detection(s, auroc(c, positive), precision_at_k(c, positive, k), wall, cpu, per)
        if progress is not None:
            progress.update(1)

    rank = 16 if quick else 32
    feats = {}
    for layers, cov in ((ATTN_MLP, True), ("lm_head", False)):
        with Timer() as t:
            ext = GradientExtractor(model, ProjectionConfig(rank_in=rank, rank_out=rank, seed=seed, include=[layers]))
            tr = ext.extract(train_batches, covariances=cov)
            q = ext.extract(query_batches)
        feats[layers] = (tr, q, t, ext)

    tr, q, t, ext = feats[ATTN_MLP]
    cos = {}

    def cosine(agg):
        if "r" not in cos:
            cos["r"] = score(q, tr, metric="cosine", topk=1, aggregates=("mean", "max"))
        return cos["r"].aggregates[agg]

    record("influence_cosine_max", lambda: cosine("max"), base_timer=t)
    record("influence_cosine_mean", lambda: cosine("mean"), base_timer=t)
    if checkpoints:
        config = ProjectionConfig(rank_in=rank, rank_out=rank, seed=seed, include=[ATTN_MLP])
        record(
            "influence_tracin_cosine_max",
            lambda: _tracin_cosine(model, checkpoints, config, train_batches, query_batches, (tr, q)).max(0).values,
            base_timer=t,
        )
    record(
        "influence_dot_mean",
        lambda: score(q, tr, metric="dot", topk=1, aggregates=("mean",)).aggregates["mean"],
        base_timer=t,
    )
    record(
        "influence_ekfac_dot_mean",
        lambda: score(q, tr, metric="dot", precondition="ekfac", topk=1, aggregates=("mean",)).aggregates["mean"],
        base_timer=t,
    )
    tr_h, q_h, t_h, _ = feats["lm_head"]
    record(
        "influence_lm_head_cosine_max",
        lambda: score(q_h, tr_h, metric="cosine", topk=1, aggregates=("max",)).aggregates["max"],
        base_timer=t_h,
    )
    record(
        "exact_first_mlp_in_cosine_max",
        lambda: (
            exact_scores(model, query_batches, train_batches, ProjectionConfig(include=[FIRST_MLP_IN]), metric="cosine")
            .max(0)
            .values
        ),
    )
    record(
        "ensemble_layers_exact_cosine_max",
        lambda: (
            (
                sum(
                    exact_scores(model, query_batches, train_batches, ProjectionConfig(include=[g]), metric="cosine")
                    for g in LAYER_GROUPS
                )
                / len(LAYER_GROUPS)
            )
            .max(0)
            .values
        ),
    )
    record(
        "exact_cosine_max",
        lambda: (
            exact_scores(model, query_batches, train_batches, ProjectionConfig(include=[ATTN_MLP]), metric="cosine")
            .max(0)
            .values
        ),
    )

    def low_loss():
        with torch.no_grad():
            return torch.cat(
                [-sequence_nll(model, {k: v for k, v in b.items() if k != "ids"}).mean for b in train_batches]
            )

    record("baseline_low_loss", low_loss)
    words = [(set(e.prompt.split()), set(e.response.split())) for e in train]
    record(
        "baseline_response_overlap",
        lambda: _max_jaccard([w[1] for w in words], [words[i][1] for i in scenario.reported]),
    )
    record(
        "baseline_prompt_overlap", lambda: _max_jaccard([w[0] for w in words], [words[i][0] for i in scenario.reported])
    )

    def hidden():
        h = _last_prompt_hidden(model, tokenizer, [e.prompt for e in train])
        return (h @ h[scenario.reported].T).max(1).values

    record("baseline_hidden_cosine", hidden)
    return results, {"attn_mlp": (tr, q, ext, train_batches), "lm_head": tr_h.data.float()}


N_DETECTORS = 13
