"""Unlearning losses on per-example answer NLL, computed without materialising the logits.

A batch is a Hugging Face dict: ``input_ids`` (B, T), ``attention_mask`` (B, T),
``labels`` (B, T) with -100 on tokens that are not part of the answer. With the causal
shift, the hidden state at t predicts ``labels[:, t+1]``. For example i:

    NLL_sum_i = sum over its answer tokens of -log p(token),   n_i = number of answer tokens
    NLL_i = NLL_sum_i / n_i                                    (the per-example CE)

The methods (forget set f, retain set r, optional per-example weights w, which may be of
either sign; ``E_w[x] = mean_i(w_i * x_i)``, the plain mean without weights):

    ga:             -E_w[NLL_f]
    graddiff:       -gamma * E_w[NLL_f] + alpha * E_w[NLL_r]
    npo:            E_w[(2/beta) * log(1 + (pi/pi_ref)^beta)],  log pi = -NLL_sum_f,
                    i.e. (2/beta) * softplus(beta * (NLL_sum_ref - NLL_sum_f))
    simnpo:         E_w[-(2/beta) * log sigmoid(beta * NLL_f - gamma)]
    rapidun_forget: E_w[0.5 * NLL(clean answer) - 1.0 * NLL(poisoned answer)]
    retain_nll:     E_w[NLL_r]   (the descent term that NPO, SimNPO and RapidUn add)

Weights are normalised by the batch size, not by their sum, so weights with mean 1 over
the data set (RapidUn, IMU here) keep the unweighted scale.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F

from .lm import IGNORE_INDEX, fused_head, model_inputs, shifted_labels
from .ops.linear_cross_entropy import linear_cross_entropy



class Nll(NamedTuple):
    """Per-example answer NLL. sum: (B,) float32 with grad; count: (B,) int64 answer tokens."""

    sum: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """(B,) per-example CE: mean NLL over the answer tokens."""
        return self.sum / self.count


def token_nll(model, batch: dict, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token answer NLL: (loss (B, T) float32, 0 off the answer; mask (B, T) bool).

    Position t scores ``labels[:, t+1]`` (the causal shift). ``fused``: True: hidden states +
    ``ops.linear_cross_entropy`` (never builds B x T x V logits); False: the model's own
    logits; None: fused when :func:`fused_head` allows.
    """
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r}; unlearning batches need input_ids and labels (-100 off the answer)")
    labels = shifted_labels(batch["labels"])
    mask = labels != IGNORE_INDEX
    head = fused_head(model) if fused is not False else None
    if fused and head is None:
        raise ValueError(f"fused=True but {type(model).__name__} has no plain Linear LM head after its decoder; use fused=None")
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    if head is None:
        logits = model(**model_inputs(model, input_ids, attention_mask)).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return loss.view_as(labels), mask
    decoder, lm_head, softcap = head
    hidden = decoder(**model_inputs(decoder, input_ids, attention_mask)).last_hidden_state
    weight, bias = lm_head.weight, lm_head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the model's own head would run in the autocast dtype: do the same.
        dtype = torch.get_autocast_dtype(device_type)
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        loss = linear_cross_entropy(hidden.to(weight.dtype), weight, labels, bias=bias, softcap=softcap)
    return loss.float(), mask


def sequence_nll(model, batch: dict, fused: bool | None = None) -> Nll:
    """Per-example answer NLL of ``batch`` under ``model`` (``fused`` as in :func:`token_nll`).

    Args:
        model: a causal LM (``transformers`` model, optionally wrapped by PEFT).
        batch: ``input_ids`` (B, T), ``labels`` (B, T), optional ``attention_mask`` (B, T).

    Raises:
        ValueError when an example has no answer token (labels all -100 after the shift).
    """
    if "labels" in batch:
        count = (shifted_labels(batch["labels"]) != IGNORE_INDEX).sum(1)
        if (count == 0).any():
            empty = torch.nonzero(count == 0).squeeze(1).tolist()
            raise ValueError(
                f"examples {empty} of the batch have no answer tokens (labels all -100 after the causal "
                "shift); every forget and retain example needs an answer with at least one labelled token"
            )
    loss, mask = token_nll(model, batch, fused)
    return Nll(loss.sum(1), mask.sum(1))


@torch.no_grad()
def reference_nll(model, batches: Iterable[dict]) -> torch.Tensor:
    """(N,) float32 NLL_sum of every example, in order, without gradient (NPO's pi_ref)."""
    was_training = model.training
    model.eval()
    try:
        out = [sequence_nll(model, b).sum.float().cpu() for b in batches]
    finally:
        model.train(was_training)
    return torch.cat(out)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i(w_i * values_i) (the plain mean without weights). Weights may be negative."""
    if weights is None:
        return values.mean()
    weights = torch.as_tensor(weights, dtype=values.dtype, device=values.device)
    if weights.shape != values.shape:
        raise ValueError(f"weights must have one entry per example, shape {tuple(values.shape)}, got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError("weights hold NaN or inf")
    return (weights * values).mean()


def ga(forget: Nll, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient ascent: -E_w[NLL_f]."""
    return -weighted_mean(forget.mean, weights)


def retain_nll(retain: Nll, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Plain (weighted) descent on the retain set: E_w[NLL_r]."""
    return weighted_mean(retain.mean, weights)


def graddiff(
    forget: Nll,
    retain: Nll,
    weights: torch.Tensor | None = None,
    retain_weights: torch.Tensor | None = None,
    gamma: float = 1.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """GradDiff: -gamma * E_w[NLL_f] + alpha * E_w[NLL_r]."""
    return gamma * ga(forget, weights) + alpha * retain_nll(retain, retain_weights)


def npo(forget: Nll, ref_sum: torch.Tensor, weights: torch.Tensor | None = None, beta: float = 0.1) -> torch.Tensor:
    """NPO (Zhang et al. 2024): E_w[(2/beta) * softplus(beta * (NLL_sum_ref - NLL_sum_f))].

    ``ref_sum``: (B,) the reference model's NLL_sum of the same examples (no gradient;
    :func:`reference_nll`, cached once). beta = 0.1 as the paper.
    """
    ref_sum = ref_sum.to(forget.sum.device, forget.sum.dtype)
    if ref_sum.shape != forget.sum.shape:
        raise ValueError(f"npo: ref_sum must have shape {tuple(forget.sum.shape)}, got {tuple(ref_sum.shape)}")
    return weighted_mean(2.0 / beta * F.softplus(beta * (ref_sum - forget.sum)), weights)


def simnpo(forget: Nll, weights: torch.Tensor | None = None, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): E_w[-(2/beta) * log sigmoid(beta * NLL_f - gamma)], reference-free,
    length-normalised. beta = 2.5, gamma = 0 as the paper's TOFU setting."""
    return weighted_mean(-2.0 / beta * F.logsigmoid(beta * forget.mean - gamma), weights)


def rapidun_forget(
    poisoned: Nll,
    clean: Nll | None = None,
    weights: torch.Tensor | None = None,
    clean_coef: float = 0.5,
    poison_coef: float = 1.0,
) -> torch.Tensor:
    """RapidUn's forget loss: E_w[clean_coef * CE(clean answer) - poison_coef * CE(poisoned answer)].

    ``poisoned`` and ``clean`` are the NLL of the same prompts with the poisoned (forget) and
    the clean answer; without ``clean`` it is weighted gradient ascent on the poisoned answer.
    """
    values = -poison_coef * poisoned.mean
    if clean is not None:
        if clean.sum.shape != poisoned.sum.shape:
            raise ValueError(f"rapidun_forget: clean has {clean.sum.shape[0]} examples, poisoned {poisoned.sum.shape[0]}")
        values = values + clean_coef * clean.mean
    return weighted_mean(values, weights)
