"""Unlearning losses on per-example answer NLL, computed without materialising the logits.

A batch is a Hugging Face dict: ``input_ids`` (B, T), ``attention_mask`` (B, T),
``labels`` (B, T) with -100 on tokens that are not part of the answer. With the causal
shift, the hidden state at t predicts ``labels[:, t+1]``. For example i:

    NLL_sum_i = sum over its answer tokens of -log p(token),   n_i = number of answer tokens
    NLL_i = NLL_sum_i / n_i                                    (the per-example CE)

Token losses are reduced with per-example weights w (of either sign, 1 without weights)
in one of two ways, ``reduction``:

    "example":  R_w[NLL] = sum_i w_i NLL_i / B                 (mean of per-example means)
    "token":    R_w[NLL] = sum_i w_i NLL_sum_i / sum_i n_i     (token mean over the batch, as
                                                                HF's loss and open-unlearning)

With ``weight_norm="sum"`` the divisor becomes sum_i w_i (example) or sum_i w_i n_i (token):
a weighted average, as IMU's -sum(w l) / sum(w). The default ``"mean"`` divides by the batch
size or token count, so weights with mean 1 over the data set (RapidUn, IMU here) keep the
unweighted scale.

The methods (forget set f, retain set r; sequence-level terms use E_w[x] = sum_i w_i x_i / B):

    ga:             -R_w[NLL_f]
    graddiff:       -gamma * R_w[NLL_f] + alpha * R_w[NLL_r]
    npo:            E_w[(2/beta) * log(1 + (pi/pi_ref)^beta)],  log pi = -NLL_sum_f,
                    i.e. (2/beta) * softplus(beta * (NLL_sum_ref - NLL_sum_f))
    simnpo:         E_w[-(2/beta) * log sigmoid(beta * (NLL_f - delta) - gamma)]
    rapidun_forget: 0.5 * R_w[NLL(clean answer)] - 1.0 * R_w[NLL(poisoned answer)]
                    (tokens="differing": both NLLs over the answer tokens where the two differ)
    retain_nll:     R_w[NLL_r]   (the descent term that NPO, SimNPO and RapidUn add)
    retain KL:      R_w[KL_r] with :func:`sequence_kl`, KL(reference || model) per position

SimNPO's margin is ``gamma`` in the paper's units or ``delta`` in open-unlearning's
(gamma = beta * delta). NPO and SimNPO are means over examples under either reduction.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .lm import IGNORE_INDEX, fused_head, model_inputs, shifted_labels
from .ops.linear_cross_entropy import linear_cross_entropy
from .options import RAPIDUN_TOKENS as TOKENS
from .options import REDUCTIONS, WEIGHT_NORMS
from .sharding import head_call


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Nll(NamedTuple):
    """Per-example answer NLL. sum: (B,) float32 (float64 for float64 models) with grad; count: (B,) int64 tokens."""

    sum: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """(B,) per-example CE: mean NLL over the answer tokens."""
        return self.sum / self.count


def token_nll(model, batch: dict, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token answer NLL: (loss (B, T) float32 (float64 for a float64 model), 0 off the answer; mask (B, T) bool).

    Position t scores ``labels[:, t+1]`` (the causal shift). ``fused``: True: hidden states +
    ``ops.linear_cross_entropy`` (never builds B x T x V logits); False: the model's own
    logits; None: fused when :func:`fused_head` allows.
    """
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(
                f"batch has no {key!r}; unlearning batches need input_ids and labels (-100 off the answer)"
            )
    labels = shifted_labels(batch["labels"])
    mask = labels != IGNORE_INDEX
    head = fused_head(model) if fused is not False else None
    if fused and head is None:
        raise ValueError(
            f"fused=True but {type(model).__name__} has no plain Linear LM head after its decoder; use fused=None"
        )
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    if head is None:
        logits = _upcast(model(**model_inputs(model, input_ids, attention_mask)).logits)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return loss.view_as(labels), mask
    softcap = head[2]

    def head_loss(hidden, weight, bias):
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Under autocast the model's own head would run in the autocast dtype: do the same.
            dtype = torch.get_autocast_dtype(device_type)
            weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(hidden.to(weight.dtype), weight, labels, bias=bias, softcap=softcap)

    # inside the head's forward on a sharded model, where its weight is whole
    loss = head_call(model, head, input_ids, attention_mask, head_loss)
    return _upcast(loss), mask


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
    """(N,) NLL_sum of every example, in order, float32 (float64 for float64 models), no gradient (NPO's pi_ref)."""
    was_training = model.training
    model.eval()
    try:
        out = [_upcast(sequence_nll(model, b).sum).cpu() for b in batches]
    finally:
        model.train(was_training)
    return torch.cat(out)


KL_POSITIONS = ("all", "answer")


def _logits(model, batch: dict) -> torch.Tensor:
    return _upcast(model(**model_inputs(model, batch["input_ids"], batch.get("attention_mask"))).logits)


def sequence_kl(model, batch: dict, ref_model=None, positions: str = "all") -> Nll:
    """Per-example KL(reference || model) of the next-token distributions, as an :class:`Nll`.

    ``sum``: (B,) the KL summed over the example's positions (with grad); ``count``: (B,) the
    number of positions. ``positions="all"``: every position of the padded batch (T each),
    open-unlearning's KL retain loss (its ``batchmean`` over B * T rows is the token
    reduction of this); ``"answer"``: the positions that predict answer tokens.

    The reference is ``ref_model`` (frozen, no gradient) or, when it is None and ``model`` is
    a PEFT model, the same model with its adapter disabled. Builds the B x T x V logits of
    both models (the KL needs every vocabulary entry).
    """
    if positions not in KL_POSITIONS:
        raise ValueError(f"positions must be one of {KL_POSITIONS}, got {positions!r}")
    if ref_model is None and not hasattr(model, "disable_adapter"):
        raise ValueError(
            "the KL retain loss needs a reference: pass ref_model= (a frozen copy of the model "
            "before unlearning), or train a PEFT adapter so the base model is the reference"
        )
    with torch.no_grad():
        if ref_model is None:
            with model.disable_adapter():
                ref = _logits(model, batch)
        else:
            ref = _logits(ref_model, batch)
    logp = torch.log_softmax(_logits(model, batch), -1)
    kl = F.kl_div(logp, torch.log_softmax(ref, -1), reduction="none", log_target=True).sum(-1)
    if positions == "all":
        mask = torch.ones_like(kl, dtype=torch.bool)
    else:
        mask = shifted_labels(batch["labels"]) != IGNORE_INDEX
    return Nll((kl * mask).sum(1), mask.sum(1))


def _check_weights(weights, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones_like(like)
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if weights.shape != like.shape:
        raise ValueError(
            f"weights must have one entry per example, shape {tuple(like.shape)}, got {tuple(weights.shape)}"
        )
    if not torch.isfinite(weights).all():
        raise ValueError("weights hold NaN or inf")
    return weights


def _divide(total: torch.Tensor, norm: torch.Tensor, weights: torch.Tensor, weight_norm: str) -> torch.Tensor:
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
    if weight_norm == "sum" and norm == 0:
        if (weights == 0).all():  # nothing to unlearn in this batch (IMU gives weight 0 to skipped examples)
            return total * 0.0
        raise ValueError("weight_norm='sum' but the weights of this batch sum to 0; use weight_norm='mean'")
    return total / norm


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None = None, weight_norm: str = "mean") -> torch.Tensor:
    """sum_i(w_i * values_i) / B, or / sum_i w_i with ``weight_norm="sum"``. Weights may be negative."""
    w = _check_weights(weights, values)
    norm = w.sum() if weight_norm == "sum" else values.new_tensor(values.numel())
    return _divide((w * values).sum(), norm, w, weight_norm)


def reduce(
    loss: Nll, weights: torch.Tensor | None = None, reduction: str = "example", weight_norm: str = "mean"
) -> torch.Tensor:
    """R_w of a per-example token loss (``sum``, ``count``), as in the module docstring.

    ``reduction="example"``: mean over examples of their token means; ``"token"``: token mean
    over the whole batch, each token weighted by its example's weight.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "example":
        return weighted_mean(loss.mean, weights, weight_norm)
    w = _check_weights(weights, loss.sum)
    count = loss.count.to(loss.sum.dtype)
    return _divide((w * loss.sum).sum(), (w * count).sum() if weight_norm == "sum" else count.sum(), w, weight_norm)


def ga(
    forget: Nll, weights: torch.Tensor | None = None, reduction: str = "example", weight_norm: str = "mean"
) -> torch.Tensor:
    """Gradient ascent: -R_w[NLL_f]."""
    return -reduce(forget, weights, reduction, weight_norm)


def retain_nll(
    retain: Nll, weights: torch.Tensor | None = None, reduction: str = "example", weight_norm: str = "mean"
) -> torch.Tensor:
    """Plain (weighted) descent on the retain set: R_w[NLL_r]; also R_w[KL_r] of :func:`sequence_kl`."""
    return reduce(retain, weights, reduction, weight_norm)


def graddiff(
    forget: Nll,
    retain: Nll,
    weights: torch.Tensor | None = None,
    retain_weights: torch.Tensor | None = None,
    gamma: float = 1.0,
    alpha: float = 1.0,
    reduction: str = "example",
) -> torch.Tensor:
    """GradDiff: -gamma * R_w[NLL_f] + alpha * R_w[NLL_r] (``retain`` may be a :func:`sequence_kl`)."""
    return gamma * ga(forget, weights, reduction) + alpha * retain_nll(retain, retain_weights, reduction)


def npo(
    forget: Nll,
    ref_sum: torch.Tensor,
    weights: torch.Tensor | None = None,
    beta: float = 0.1,
    weight_norm: str = "mean",
) -> torch.Tensor:
    """NPO (Zhang et al. 2024): E_w[(2/beta) * softplus(beta * (NLL_sum_ref - NLL_sum_f))].

    ``ref_sum``: (B,) the reference model's NLL_sum of the same examples (no gradient;
    :func:`reference_nll`, cached once). beta = 0.1 as the paper.
    """
    ref_sum = ref_sum.to(forget.sum.device, forget.sum.dtype)
    if ref_sum.shape != forget.sum.shape:
        raise ValueError(f"npo: ref_sum must have shape {tuple(forget.sum.shape)}, got {tuple(ref_sum.shape)}")
    return weighted_mean(2.0 / beta * F.softplus(beta * (ref_sum - forget.sum)), weights, weight_norm)


def simnpo(
    forget: Nll,
    weights: torch.Tensor | None = None,
    beta: float = 2.5,
    gamma: float = 0.0,
    delta: float = 0.0,
    weight_norm: str = "mean",
) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): E_w[-(2/beta) * log sigmoid(beta * (NLL_f - delta) - gamma)], reference-free,
    length-normalised. The margin is ``gamma`` in the paper's units or ``delta`` in open-unlearning's
    (gamma = beta * delta); give one of them. beta = 2.5, gamma = 0 as the paper's TOFU setting."""
    if gamma and delta:
        raise ValueError(
            f"simnpo: give the margin as gamma (paper) or delta (open-unlearning, gamma = beta * delta), "
            f"not both (got gamma={gamma}, delta={delta})"
        )
    return weighted_mean(-2.0 / beta * F.logsigmoid(beta * (forget.mean - delta) - gamma), weights, weight_norm)


class TokenNll(NamedTuple):
    """Per-token answer NLL, for losses that choose which answer tokens count.

    loss: (B, T) float32 with grad, 0 off the answer; labels: (B, T) int64 shifted labels
    (position t holds the token it predicts, -100 off the answer). ``sum``, ``count`` and
    ``mean`` are those of :class:`Nll`.
    """

    loss: torch.Tensor
    labels: torch.Tensor

    @property
    def sum(self) -> torch.Tensor:
        return self.loss.sum(1)

    @property
    def count(self) -> torch.Tensor:
        return (self.labels != IGNORE_INDEX).sum(1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count


def answer_token_nll(model, batch: dict, fused: bool | None = None) -> TokenNll:
    """Per-token answer NLL of ``batch`` (``fused`` as in :func:`token_nll`)."""
    loss, mask = token_nll(model, batch, fused)
    if not mask.any(1).all():
        empty = torch.nonzero(~mask.any(1)).squeeze(1).tolist()
        raise ValueError(
            f"examples {empty} of the batch have no answer tokens (labels all -100 after the causal shift)"
        )
    return TokenNll(loss, shifted_labels(batch["labels"]).masked_fill(~mask, IGNORE_INDEX))


def differing_masks(poisoned_labels: torch.Tensor, clean_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which answer tokens of the poisoned and the clean answer differ: two (B, T) bool masks.

    Per example, the answers (labels != -100, in order) lose their longest common prefix
    and then their longest common suffix; what remains differs (e.g. the wrong value in
    "The capital is Rome." against "The capital is Paris."). Answers that are equal
    keep every token (there is nothing to single out). Padding may differ between the two.
    """
    if poisoned_labels.shape[0] != clean_labels.shape[0]:
        raise ValueError(
            f"differing_masks: {poisoned_labels.shape[0]} poisoned and {clean_labels.shape[0]} clean answers"
        )
    masks = []
    for labels in (poisoned_labels, clean_labels):
        masks.append(torch.zeros_like(labels, dtype=torch.bool))
    for b in range(poisoned_labels.shape[0]):
        pos = [torch.nonzero(lab[b] != IGNORE_INDEX).squeeze(1) for lab in (poisoned_labels, clean_labels)]
        p, c = poisoned_labels[b, pos[0]].tolist(), clean_labels[b, pos[1]].tolist()
        if p == c:
            masks[0][b, pos[0]], masks[1][b, pos[1]] = True, True
            continue
        n = min(len(p), len(c))
        pre = next((i for i in range(n) if p[i] != c[i]), n)
        suf = next((i for i in range(n - pre) if p[-1 - i] != c[-1 - i]), n - pre)
        masks[0][b, pos[0][pre : len(p) - suf]] = True
        masks[1][b, pos[1][pre : len(c) - suf]] = True
    return masks[0], masks[1]


def _masked(nll: TokenNll, keep: torch.Tensor) -> Nll:
    """The Nll of only the kept tokens (every example keeps at least one: see differing_masks)."""
    keep = keep.to(nll.loss.device)
    return Nll((nll.loss * keep).sum(1), keep.sum(1))


def rapidun_forget(
    poisoned: Nll | TokenNll,
    clean: Nll | TokenNll | None = None,
    weights: torch.Tensor | None = None,
    clean_coef: float = 0.5,
    poison_coef: float = 1.0,
    reduction: str = "example",
    tokens: str = "all",
) -> torch.Tensor:
    """RapidUn's forget loss: clean_coef * R_w[CE(clean answer)] - poison_coef * R_w[CE(poisoned answer)].

    ``poisoned`` and ``clean`` are the NLL of the same prompts with the poisoned (forget) and
    the clean answer; without ``clean`` it is weighted gradient ascent on the poisoned answer.
    With ``reduction="example"`` this is E_w[clean_coef * CE(clean) - poison_coef * CE(poisoned)].

    ``tokens="differing"``: each CE counts only the answer tokens where the two answers
    differ (:func:`differing_masks`); both must then be :class:`TokenNll`
    (:func:`answer_token_nll`). When the answers share every token but a value, the full
    loss is a net gradient ascent (0.5 - 1.0 < 0) on the shared tokens, which teaches the
    model to stop producing the answer template itself; the differing-token loss pushes only
    on the value.
    """
    if tokens not in TOKENS:
        raise ValueError(f"rapidun_forget: tokens must be one of {TOKENS}, got {tokens!r}")
    if clean is not None and clean.sum.shape != poisoned.sum.shape:
        raise ValueError(f"rapidun_forget: clean has {clean.sum.shape[0]} examples, poisoned {poisoned.sum.shape[0]}")
    if tokens == "differing":
        if clean is None or not (isinstance(poisoned, TokenNll) and isinstance(clean, TokenNll)):
            raise ValueError(
                "rapidun_forget(tokens='differing') compares the poisoned and the clean answer token by token: "
                "give both as TokenNll from losses.answer_token_nll(model, batch)"
            )
        keep_p, keep_c = differing_masks(poisoned.labels, clean.labels)
        poisoned, clean = _masked(poisoned, keep_p), _masked(clean, keep_c)
    loss = -poison_coef * reduce(poisoned, weights, reduction)
    if clean is not None:
        loss = loss + clean_coef * reduce(clean, weights, reduction)
    return loss


# -- The router auxiliary loss of MoE models ------------------------------------------------


class RouterAux:
    """The router auxiliary (load-balancing) loss of a ``transformers`` MoE model, for the forwards
    of an unlearning step.

    The losses above read the answer NLL only (the fused path never calls the causal LM's own
    forward), so the auxiliary loss that ``output_router_logits=True`` adds to ``outputs.loss``
    is left out. When asked for, this adds it back the way the model computes it: the decoder's
    router logits are recorded as the model records them (its ``_can_record_outputs``), and
    each forward with gradient between :meth:`arm` and :meth:`take` contributes
    ``coef * load_balancing_loss_func(router logits, num_experts, num_experts_per_tok,
    attention_mask)`` (the model module's own function). Forwards without gradient (references)
    are not counted.

    ``coef``: True for the model's ``router_aux_loss_coef``, or a number.
    """

    def __init__(self, model, coef: bool | float = True):
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        get_decoder = getattr(lm, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        recorder = (getattr(decoder, "_can_record_outputs", None) or {}).get("router_logits")
        fn = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
        if recorder is None or fn is None or not hasattr(lm, "router_aux_loss_coef"):
            raise ValueError(
                f"router_aux_loss: {type(lm).__name__} has no router auxiliary loss (transformers computes none for "
                "it); leave router_aux_loss off"
            )
        self.coef = float(lm.router_aux_loss_coef if coef is True else coef)
        self.fn, self.lm = fn, lm
        target, self.index = getattr(recorder, "target_class", recorder), getattr(recorder, "index", 0)
        self.armed, self.terms, self._logits = False, [], []
        self._mask: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._record) for m in decoder.modules() if isinstance(m, target)]
        self.handles += [
            decoder.register_forward_pre_hook(self._begin, with_kwargs=True),
            decoder.register_forward_hook(self._end),
        ]

    def _begin(self, module, args, kwargs):
        self._logits, self._mask = [], kwargs.get("attention_mask")

    def _record(self, module, args, output):
        if self.armed and torch.is_grad_enabled():
            self._logits.append(output[self.index] if isinstance(output, (tuple, list)) else output)

    def _end(self, module, args, output):
        if self.armed and self._logits:
            self.terms.append(
                self.fn(tuple(self._logits), self.lm.num_experts, self.lm.num_experts_per_tok, self._mask)
            )
        self._logits = []

    def arm(self) -> None:
        """Start counting the forwards of a step."""
        self.armed, self.terms = True, []

    def take(self) -> torch.Tensor:
        """coef * the sum of the auxiliary losses of the forwards since :meth:`arm` (0 when none); disarms."""
        terms, self.armed, self.terms = self.terms, False, []
        if not terms:
            return torch.zeros(())
        return self.coef * torch.stack([t.to(terms[0].device) for t in terms]).sum()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
