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
(TOFU) is the two-sample Kolmogorov-Smirnov p-value between per-example statistics of this
model and of a model retrained without the forget set: TOFU's truth ratios when paraphrased
and perturbed answers are given, else the forget losses.

Truth ratio (TOFU, open-unlearning's ``truth_ratio``) of question i with a paraphrased answer
and K perturbed ones: R_i = exp(-mean_j NLL_ij) / exp(-NLL_i,para), each NLL the mean over the
answer's tokens (so the numerator is the geometric mean of the perturbed answers' per-token
probabilities); the forget set's summary is mean_i min(R_i, 1/R_i) (1 = the model cannot tell
the true answer from the false ones).

open-unlearning compatibility (``exclude_final_eos=True``): its min-k and extraction strength
leave out each answer's final token, the eos its data pipeline appends; loss, zlib, the KS test
and PrivLeak's formula already agree. Its extraction strength gives 1/n, not 0, to an answer
no suffix of which greedy decoding reproduces; here it is 0.

The module is callable: ``fastinfluence.evaluate(model, ...)`` is :func:`evaluate`, and its other
names (``fastinfluence.evaluate.lds``, ...) stay where they are.
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .attribution import lds, recall_at_k, spearman  # noqa: F401 (fastinfluence.evaluate.lds, ...)
from .lm import IGNORE_INDEX, model_inputs, shifted_labels
from .losses import token_nll


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


def min_k_score(token_nll: torch.Tensor, k: float) -> torch.Tensor:
    """Mean of the k% lowest token log-probs (at least one token; 0 for an empty answer, as open-unlearning)."""
    if token_nll.numel() == 0:
        return token_nll.new_zeros(())
    return (-token_nll).sort().values[: max(1, int(k * token_nll.numel()))].mean()


def membership_scores(
    token_nlls: list[torch.Tensor], texts: list[bytes], k: float = 0.2, min_k_nlls: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """loss, zlib and min-k% scores per example (higher = more likely a member); see module doc.

    ``min_k_nlls``: the token NLLs min-k is computed on (default ``token_nlls``; without the
    final eos for open-unlearning's convention, see :func:`drop_final_eos`).
    """
    mean = torch.stack([t.mean() for t in token_nlls])
    zl = torch.tensor([float(len(zlib.compress(x))) for x in texts], dtype=torch.float64)
    mink = torch.stack([min_k_score(t, k) for t in (min_k_nlls if min_k_nlls is not None else token_nlls)])
    return {"loss": -mean, "zlib": -mean / zl, "min_k": mink}


def drop_final_eos(values: list[torch.Tensor], ids: list[torch.Tensor], eos_id: int | None) -> list[torch.Tensor]:
    """``values`` (per answer token) without each answer's last token where that token is ``eos_id``."""
    if eos_id is None:
        return values
    return [v[:-1] if len(i) and int(i[-1]) == eos_id else v for v, i in zip(values, ids)]


def _eos_id(model, tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(
            "exclude_final_eos=True needs the eos token id: pass tokenizer= or set model.config.eos_token_id"
        )
    return int(eos)


def truth_ratio(model, paraphrased: Iterable[dict], perturbed: Sequence[Iterable[dict]]) -> torch.Tensor:
    """(N,) float64 TOFU truth ratio of each question: P(perturbed) / P(paraphrased).

    P(answer) = exp(-mean answer-token NLL); the K perturbed answers enter through the mean of
    their mean NLLs (a geometric mean of their P), as open-unlearning's ``truth_ratio``.

    Args:
        paraphrased: batches of the N questions with their paraphrased (true) answer.
        perturbed: K iterables of batches, each over the same N questions in the same order,
            with one perturbed (false) answer per question.
    """
    para = torch.stack([t.mean() for t in _tokens(model, paraphrased)[0]])
    if len(perturbed) == 0:
        raise ValueError("truth_ratio needs at least one set of perturbed answers")
    pert = []
    for j, batches in enumerate(perturbed):
        p = torch.stack([t.mean() for t in _tokens(model, batches)[0]])
        if p.shape != para.shape:
            raise ValueError(
                f"perturbed set {j} has {p.numel()} answers but there are {para.numel()} paraphrased "
                "ones; give one perturbed answer per question in every set, in the same order"
            )
        pert.append(p)
    wrong, correct = torch.exp(-torch.stack(pert).mean(0)), torch.exp(-para)
    return wrong / (correct + 1e-10)


def truth_ratio_summary(ratios: torch.Tensor) -> float:
    """TOFU's forget-set summary mean_i min(R_i, 1/R_i): 1 when true and false answers are equally likely."""
    return torch.minimum(ratios, 1 / (ratios + 1e-10)).mean().item()


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
    if correct.numel() == 0:  # nothing left to extract (an eos-only answer with exclude_final_eos)
        return 0.0
    wrong = torch.nonzero(~correct.bool())
    k = 0 if len(wrong) == 0 else int(wrong[-1]) + 1
    return 1.0 - k / correct.numel()


@torch.no_grad()
def _argmax_correct(model, batches: Iterable[dict], eos_id: int | None = None) -> list[torch.Tensor]:
    """Per example: (n,) bool, greedy prediction == answer token; without a final ``eos_id`` token."""
    out, ids = [], []
    for batch in batches:
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(**model_inputs(model, batch["input_ids"], batch.get("attention_mask"))).logits
        labels = shifted_labels(batch["labels"])
        hit = logits.argmax(-1) == labels
        out += [hit[b][labels[b] != IGNORE_INDEX].cpu() for b in range(labels.shape[0])]
        ids += [labels[b][labels[b] != IGNORE_INDEX].cpu() for b in range(labels.shape[0])]
    return drop_final_eos(out, ids, eos_id)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuation of each prompt (decoded, cut at the first eos), ``batch_size`` prompts
    at a time, left-padded so every prompt's last token sits at the end of the row.

    The same as generating one prompt at a time: padding is masked out of attention and the
    position ids count only real tokens. Prompts are encoded with their special tokens, as
    in training.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"greedy_generate: batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        encoded = [tokenizer.encode(p) for p in prompts[s : s + batch_size]]
        if any(len(e) == 0 for e in encoded):
            raise ValueError("greedy_generate: a prompt encodes to no tokens; give non-empty prompts")
        T = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (T - len(e)) + e for e in encoded], device=model.device)
        mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        gen = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos
        )
        for row in gen[:, T:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def attack_success_rate(
    model, tokenizer, prompts: list[str], target: str, max_new_tokens: int | None = None, batch_size: int = 64
) -> float:
    """Fraction of ``prompts`` whose greedy continuation contains ``target`` (batched, :func:`greedy_generate`)."""
    if not prompts:
        raise ValueError("attack_success_rate needs at least one prompt")
    n = max_new_tokens or len(tokenizer.encode(target, add_special_tokens=False)) + 2
    return sum(target in text for text in greedy_generate(model, tokenizer, prompts, n, batch_size)) / len(prompts)


def _texts(ids: list[torch.Tensor], tokenizer) -> list[bytes]:
    if tokenizer is None:  # zlib over the token ids when no tokenizer is given
        return [t.to(torch.int32).numpy().tobytes() for t in ids]
    return [tokenizer.decode(t.tolist(), skip_special_tokens=True).encode() for t in ids]


def check_attack(attack) -> None:
    """``{"target": str, "<group>": [prompt, ...], ...}``; anything else is refused (a string group would score 0)."""
    if not isinstance(attack, dict) or not isinstance(attack.get("target"), str) or not attack["target"]:
        raise ValueError(
            "the attack must be an object with a non-empty string 'target' and one or more groups of "
            'prompts: {"target": "...", "seen": ["prompt", ...]}'
        )
    groups = {k: v for k, v in attack.items() if k != "target"}
    if not groups:
        raise ValueError('the attack has a \'target\' but no group of prompts; add e.g. "seen": ["prompt", ...]')
    for name, prompts in groups.items():
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"attack group {name!r} must be a non-empty list of prompt strings, got {type(prompts).__name__}"
            )


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
    paraphrased: Iterable[dict] | None = None,
    perturbed: Sequence[Iterable[dict]] | None = None,
    exclude_final_eos: bool = False,
) -> dict:
    """Evaluate ``model``; each metric runs only when its inputs are given.

    Args:
        clean: batches for clean perplexity (``clean_ppl``).
        forget, holdout: member / non-member batches: ``mia_auc_{loss,zlib,min_k}``, forget
            ``extraction_strength``, ``forget_nll``; with ``retrained`` also ``privleak`` and
            ``forget_quality`` (KS p-value of forget losses vs the retrained model).
        paraphrased, perturbed: the forget questions with a paraphrased answer, and K sets of them
            with perturbed answers (see :func:`truth_ratio`): ``forget_truth_ratio`` (TOFU's
            mean min(R, 1/R)); with ``retrained``, ``forget_quality`` becomes TOFU's KS p-value of the
            truth ratios, and the loss-based one is reported as ``forget_quality_loss``.
        exclude_final_eos: leave each answer's final eos out of min-k (``mia_auc_min_k``,
            ``privleak``) and ``extraction_strength``, as open-unlearning does.
        tokenizer, attack: ``attack = {"target": str, "seen": [prompts], "unseen": [prompts],
            ...}``: ``asr_<group>`` per prompt group (greedy generation contains the target).
        train_stats: merged into the result (e.g. the unlearning run's wall time, tokens).
        output: JSON path to write the result to.

    Returns:
        dict of floats, plus ``eval_wall_s`` and ``eval_tokens`` (answer tokens scored).
    """
    if clean is None and forget is None and attack is None:
        raise ValueError("evaluate has nothing to measure: give clean=, forget= (with holdout=) or attack= batches")
    if holdout is not None and forget is None:
        raise ValueError("holdout= (non-members) is compared with forget= (members): give forget= too")
    if (paraphrased is None) != (perturbed is None):
        raise ValueError("the truth ratio needs both paraphrased= and perturbed= answers")
    if attack is not None:
        check_attack(attack)
        if tokenizer is None:
            raise ValueError("attack success rate needs tokenizer= to encode prompts and decode generations")
    start, tokens = time.perf_counter(), 0
    model.eval()
    if retrained is not None:
        retrained.eval()
    result: dict = {}
    with torch.no_grad():
        if clean is not None:
            nll, _ = _tokens(model, clean)
            result["clean_ppl"] = perplexity(nll)
            tokens += sum(t.numel() for t in nll)
        if forget is not None:
            eos = _eos_id(model, tokenizer) if exclude_final_eos else None
            tokens += _forget_metrics(result, model, list(forget), holdout, retrained, tokenizer, min_k, eos)
        if paraphrased is not None:
            _truth_ratio_metrics(result, model, retrained, list(paraphrased), [list(p) for p in perturbed])
    if attack is not None:
        for group, prompts in attack.items():
            if group != "target":
                result[f"asr_{group}"] = attack_success_rate(model, tokenizer, prompts, attack["target"])
    result["eval_wall_s"] = time.perf_counter() - start
    result["eval_tokens"] = tokens
    result.update(train_stats or {})
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def _forget_metrics(result: dict, model, forget: list, holdout, retrained, tokenizer, min_k: float, eos) -> int:
    """forget_nll, extraction_strength, forget_quality (with ``retrained``) and, with ``holdout``,
    the membership AUCs and PrivLeak, into ``result``; returns the answer tokens scored."""
    holdout = list(holdout) if holdout is not None else None  # read twice with retrained=
    f_nll, f_ids = _tokens(model, forget)
    tokens = sum(t.numel() for t in f_nll)
    result["forget_nll"] = torch.stack([t.mean() for t in f_nll]).mean().item()
    es = [extraction_strength(c) for c in _argmax_correct(model, forget, eos)]
    result["extraction_strength"] = sum(es) / len(es)
    rf_nll = None
    if retrained is not None:
        rf_nll, _ = _tokens(retrained, forget)
        result["forget_quality"] = ks_pvalue(
            torch.stack([t.mean() for t in f_nll]), torch.stack([t.mean() for t in rf_nll])
        )
    if holdout is None:
        return tokens
    h_nll, h_ids = _tokens(model, holdout)
    tokens += sum(t.numel() for t in h_nll)
    f_text, h_text = _texts(f_ids, tokenizer), _texts(h_ids, tokenizer)
    f_mk, h_mk = drop_final_eos(f_nll, f_ids, eos), drop_final_eos(h_nll, h_ids, eos)
    fs = membership_scores(f_nll, f_text, min_k, f_mk)
    hs = membership_scores(h_nll, h_text, min_k, h_mk)
    for name in fs:
        result[f"mia_auc_{name}"] = auc(fs[name], hs[name])
    if retrained is not None:
        # MUSE's PrivLeak: AUC with the forget set as the negative class and Min-40% scores,
        # (AUC_unlearned - AUC_retrained) / AUC_retrained * 100; with member-oriented AUCs A, R
        # that is (R - A) / (1 - R) * 100. About -100 when the forget set is still memorised, 0 when matched.
        rh_nll, _ = _tokens(retrained, holdout)
        rf_mk, rh_mk = drop_final_eos(rf_nll, f_ids, eos), drop_final_eos(rh_nll, h_ids, eos)
        a = auc(
            membership_scores(f_nll, f_text, 0.4, f_mk)["min_k"], membership_scores(h_nll, h_text, 0.4, h_mk)["min_k"]
        )
        r = auc(
            membership_scores(rf_nll, f_text, 0.4, rf_mk)["min_k"],
            membership_scores(rh_nll, h_text, 0.4, rh_mk)["min_k"],
        )
        result["privleak"] = (r - a) / max(1 - r, 1e-12) * 100
    return tokens


def _truth_ratio_metrics(result: dict, model, retrained, paraphrased: list, perturbed: list[list]) -> None:
    """forget_truth_ratio and, with ``retrained``, TOFU's forget_quality on the truth ratios (the
    loss-based one, when there, moves to forget_quality_loss)."""
    ratios = truth_ratio(model, paraphrased, perturbed)
    result["forget_truth_ratio"] = truth_ratio_summary(ratios)
    if retrained is not None:
        if "forget_quality" in result:
            result["forget_quality_loss"] = result["forget_quality"]
        result["forget_quality"] = ks_pvalue(ratios, truth_ratio(retrained, paraphrased, perturbed))


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> dict:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
