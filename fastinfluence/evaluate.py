"""Evaluation of an unlearned model: utility, attack success, membership leakage, forget quality.

Batches are HF dicts (``input_ids``, ``attention_mask``, ``labels`` with -100 off the
answer); every score is over answer tokens. Membership scores are oriented so that higher
means "more likely a training member":

    loss:  -NLL_i                         (mean answer-token NLL)
    zlib:  -NLL_i / zlib_bytes(answer_i)  (Carlini et al. 2021)
    min_k: mean of the k% lowest answer-token log-probs (Shi et al. 2024, k = 20%)

AUC is forget (members) against holdout (non-members); 0.5 means no leakage. PrivLeak
follows MUSE exactly (forget as the negative class, Min-40% scores):
(AUC - AUC_retrained) / AUC_retrained * 100, about -100 while the forget set is still
memorised and 0 when it matches the retrained model. Forget quality
(TOFU) is the two-sample Kolmogorov-Smirnov p-value between the per-example forget losses of
this model and of a model retrained without the forget set (TOFU compares truth ratios,
which need paraphrased answers; losses need none).
"""
from __future__ import annotations

import json
import math
import time
import zlib
from pathlib import Path
from typing import Iterable

import torch

from .lm import model_inputs
from .losses import IGNORE_INDEX, shifted_labels, token_nll


def _tokens(model, batches: Iterable[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-example answer-token NLLs (a list of 1-D float tensors) and answer token ids."""
    nll, ids = [], []
    for batch in batches:
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss, mask = token_nll(model, batch)
        labels = shifted_labels(batch["labels"])
        for b in range(loss.shape[0]):
            if not mask[b].any():
                raise ValueError(f"an evaluation example has no answer tokens (labels all {IGNORE_INDEX})")
            nll.append(loss[b][mask[b]].double().cpu())
            ids.append(labels[b][mask[b]].cpu())
    if not nll:
        raise ValueError("an evaluation set is empty")
    return nll, ids


def perplexity(token_nlls: list[torch.Tensor]) -> float:
    """exp(total NLL / total answer tokens)."""
    return math.exp(sum(t.sum().item() for t in token_nlls) / sum(t.numel() for t in token_nlls))


def membership_scores(token_nlls: list[torch.Tensor], texts: list[bytes], k: float = 0.2) -> dict[str, torch.Tensor]:
    """loss, zlib and min-k% scores per example (higher = more likely a member); see module doc."""
    mean = torch.stack([t.mean() for t in token_nlls])
    zl = torch.tensor([float(len(zlib.compress(x))) for x in texts], dtype=torch.float64)
    mink = torch.stack([(-t).sort().values[: max(1, int(k * t.numel()))].mean() for t in token_nlls])
    return {"loss": -mean, "zlib": -mean / zl, "min_k": mink}


def auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """P(member score > non-member score), ties counting one half (Mann-Whitney)."""
    diff = members.double()[:, None] - nonmembers.double()[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def ks_pvalue(x: torch.Tensor, y: torch.Tensor) -> float:
    """Two-sided two-sample Kolmogorov-Smirnov p-value.

    Exact (lattice-path count, as scipy's ``exact`` mode) when n * m <= 250000, else the
    asymptotic Kolmogorov distribution with Stephens' small-sample correction.
    """
    x, y = torch.sort(x.double().flatten()).values, torch.sort(y.double().flatten()).values
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("ks_pvalue needs two non-empty samples")
    grid = torch.cat([x, y])
    # D * n * m is an integer: max |i m - j n| over the pooled points.
    i = torch.searchsorted(x, grid, right=True)
    j = torch.searchsorted(y, grid, right=True)
    d = int((i * m - j * n).abs().max())
    if d == 0:
        return 1.0
    if n * m <= 250_000:
        # Probability that a random path from (0,0) to (i,j) has touched |i m - j n| >= d.
        # A sum of positive terms (not 1 - P(stays inside)), so tiny p-values keep their digits.
        row = [0.0] * (m + 1)
        for jj in range(1, m + 1):
            row[jj] = 1.0 if jj * n >= d else row[jj - 1]
        for ii in range(1, n + 1):
            row[0] = 1.0 if ii * m >= d else row[0]
            for jj in range(1, m + 1):
                row[jj] = 1.0 if abs(ii * m - jj * n) >= d else (row[jj] * ii + row[jj - 1] * jj) / (ii + jj)
        return min(1.0, row[m])
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d / (n * m)
    return min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))))


def extraction_strength(correct: torch.Tensor) -> float:
    """ES of one answer: 1 - k/n for the smallest prefix k of the answer after which greedy
    decoding reproduces the rest. ``correct``: (n,) bool, argmax == next token under teacher
    forcing; with the true prefix given, greedy decoding matches exactly when all later
    predictions are correct, so k = 1 + the last wrong position (0 when none)."""
    wrong = torch.nonzero(~correct.bool())
    k = 0 if len(wrong) == 0 else int(wrong[-1]) + 1
    return 1.0 - k / correct.numel()


@torch.no_grad()
def _argmax_correct(model, batches: Iterable[dict]) -> list[torch.Tensor]:
    out = []
    for batch in batches:
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(**model_inputs(model, batch["input_ids"], batch.get("attention_mask"))).logits
        labels = shifted_labels(batch["labels"])
        hit = logits.argmax(-1) == labels
        out += [hit[b][labels[b] != IGNORE_INDEX].cpu() for b in range(labels.shape[0])]
    return out


@torch.no_grad()
def attack_success_rate(model, tokenizer, prompts: list[str], target: str, max_new_tokens: int | None = None) -> float:
    """Fraction of ``prompts`` whose greedy continuation contains ``target``."""
    if not prompts:
        raise ValueError("attack_success_rate needs at least one prompt")
    n = max_new_tokens or len(tokenizer.encode(target, add_special_tokens=False)) + 2
    hits = 0
    for p in prompts:
        ids = torch.tensor([tokenizer.encode(p)], device=model.device)  # special tokens as in training
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
        hits += target in tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    return hits / len(prompts)


def _texts(ids: list[torch.Tensor], tokenizer) -> list[bytes]:
    if tokenizer is None:  # zlib over the token ids when no tokenizer is given
        return [t.to(torch.int32).numpy().tobytes() for t in ids]
    return [tokenizer.decode(t.tolist(), skip_special_tokens=True).encode() for t in ids]


def evaluate(
    model,
    *,
    clean: Iterable[dict] | None = None,
    forget: Iterable[dict] | None = None,
    holdout: Iterable[dict] | None = None,
    tokenizer=None,
    attack: dict | None = None,
    retrained=None,
    min_k: float = 0.2,
    train_stats: dict | None = None,
    output: str | Path | None = None,
) -> dict:
    """Evaluate ``model``; each metric runs only when its inputs are given.

    Args:
        clean: batches for clean perplexity (``clean_ppl``).
        forget, holdout: member / non-member batches: ``mia_auc_{loss,zlib,min_k}``, forget
            ``extraction_strength``, ``forget_nll``; with ``retrained`` also ``privleak`` and
            ``forget_quality`` (KS p-value of forget losses vs the retrained model).
        tokenizer, attack: ``attack = {"target": str, "seen": [prompts], "unseen": [prompts],
            ...}``: ``asr_<group>`` per prompt group (greedy generation contains the target).
        train_stats: merged into the result (e.g. the unlearning run's wall time, tokens).
        output: JSON path to write the result to.

    Returns:
        dict of floats, plus ``eval_wall_s`` and ``eval_tokens`` (answer tokens scored).
    """
    start, tokens = time.perf_counter(), 0
    model.eval()
    result: dict = {}
    with torch.no_grad():
        if clean is not None:
            nll, _ = _tokens(model, clean)
            result["clean_ppl"] = perplexity(nll)
            tokens += sum(t.numel() for t in nll)
        if forget is not None:
            forget = list(forget)
            holdout = list(holdout) if holdout is not None else None  # read twice with retrained=
            f_nll, f_ids = _tokens(model, forget)
            tokens += sum(t.numel() for t in f_nll)
            result["forget_nll"] = torch.stack([t.mean() for t in f_nll]).mean().item()
            es = [extraction_strength(c) for c in _argmax_correct(model, forget)]
            result["extraction_strength"] = sum(es) / len(es)
            if retrained is not None:
                retrained.eval()
                rf_nll, _ = _tokens(retrained, forget)
                result["forget_quality"] = ks_pvalue(
                    torch.stack([t.mean() for t in f_nll]), torch.stack([t.mean() for t in rf_nll])
                )
            if holdout is not None:
                h_nll, h_ids = _tokens(model, holdout)
                tokens += sum(t.numel() for t in h_nll)
                f_text, h_text = _texts(f_ids, tokenizer), _texts(h_ids, tokenizer)
                fs, hs = membership_scores(f_nll, f_text, min_k), membership_scores(h_nll, h_text, min_k)
                for name in fs:
                    result[f"mia_auc_{name}"] = auc(fs[name], hs[name])
                if retrained is not None:
                    # MUSE's PrivLeak: AUC with the forget set as the negative class and
                    # Min-40% scores, (AUC_unlearned - AUC_retrained) / AUC_retrained * 100;
                    # with member-oriented AUCs A, R that is (R - A) / (1 - R) * 100.
                    # About -100 when the forget set is still memorised, 0 when matched.
                    rh_nll, _ = _tokens(retrained, holdout)
                    a = auc(membership_scores(f_nll, f_text, 0.4)["min_k"], membership_scores(h_nll, h_text, 0.4)["min_k"])
                    r = auc(membership_scores(rf_nll, f_text, 0.4)["min_k"], membership_scores(rh_nll, h_text, 0.4)["min_k"])
                    result["privleak"] = (r - a) / max(1 - r, 1e-12) * 100
    if attack is not None:
        if tokenizer is None:
            raise ValueError("attack success rate needs tokenizer= to encode prompts and decode generations")
        target = attack["target"]
        for group, prompts in attack.items():
            if group != "target":
                result[f"asr_{group}"] = attack_success_rate(model, tokenizer, prompts, target)
    result["eval_wall_s"] = time.perf_counter() - start
    result["eval_tokens"] = tokens
    result.update(train_stats or {})
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
