"""Per-example unlearning weights from influence scores (RapidUn, IMU, low-influence
skipping, SIMU neuron masks, loss-based reweighting).

Score matrices are oriented like ``ScoreResult``: rows are queries, columns train examples.
For unlearning with a forget set F and a retain set R, each split into queries (test) and
train examples:

    ff: (Qf, Nf) forget queries x forget train     fr: (Qr, Nf) retain queries x forget train
    rf: (Qf, Nr) forget queries x retain train     rr: (Qr, Nr) retain queries x retain train
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch

from . import moe
from .batching import prepare_batch
from .capture import forward_losses, model_device
from .lm import fused_head
from .model import mlp_blocks

AGGREGATES = ("mean", "topk_median")


def _as_tensor(x) -> torch.Tensor:
    """A tensor from a tensor, a numpy array or a memmap (``score(..., matrix_path=...).matrix``)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):  # np.memmap included; copied so the file may be closed later
        return torch.from_numpy(np.array(x, dtype=np.float64))
    return torch.as_tensor(x, dtype=torch.float64)


def _matrix(name: str, scores) -> torch.Tensor:
    """A (Q, N) float64 score matrix from a tensor, a numpy array / memmap, or a ScoreResult
    holding its full matrix."""
    if not isinstance(scores, (torch.Tensor, np.ndarray)):
        full = getattr(scores, "matrix", None)
        if full is None:
            raise TypeError(
                f"{name} must be a (queries, train) score tensor or array, or a ScoreResult holding the full "
                f"matrix (score(..., matrix_path=...)); got {type(scores).__name__}"
            )
        scores = full
    scores = _as_tensor(scores)
    if scores.dim() != 2 or 0 in scores.shape:
        raise ValueError(f"{name} must be a non-empty (queries, train) matrix, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} holds NaN or inf; recompute the scores (check the features for overflow)")
    return scores.double()


# The example sets on the (query, train) sides of each RapidUn matrix.
_RAPIDUN_SIDES = {
    "ff": ("forget queries", "forget train examples"),
    "fr": ("retain queries", "forget train examples"),
    "rf": ("forget queries", "retain train examples"),
    "rr": ("retain queries", "retain train examples"),
}


def _check_rapidun_sets(matrices: dict) -> None:
    """Matrices that carry their ids (ScoreResults) agree on the example sets they share, so a
    matrix given in another's place is refused even when the shapes fit."""
    seen: dict[str, tuple[str, list]] = {}
    for name, m in matrices.items():
        sides = (getattr(m, "query_ids", None), getattr(m, "train_ids", None))
        if sides[0] is None or sides[1] is None:
            continue
        for side, ids in zip(_RAPIDUN_SIDES[name], sides):
            first, ref = seen.setdefault(side, (name, list(ids)))
            if list(ids) != ref:
                raise ValueError(
                    f"rapidun: {first} and {name} must share the {side}, but their ids differ ({first}: "
                    f"{ref[:3]}..., {name}: {list(ids)[:3]}...); pass ff, fr, rf, rr as score(forget_q, forget_train), "
                    "score(retain_q, forget_train), score(forget_q, retain_train), score(retain_q, retain_train)"
                )


def _median(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Median that averages the two middle values for an even count (numpy / statistics)."""
    return torch.quantile(x, 0.5, dim=dim) if dim is not None else torch.quantile(x, 0.5)


def aggregate_scores(scores: torch.Tensor, how: str = "mean", topk: int | None = None) -> torch.Tensor:
    """One value per train example from a (Q, N) matrix.

    ``mean``: mean over the queries. ``topk_median``: RapidUn's aggregation: per query keep
    its ``topk`` largest scores (all when None) and zero the rest, then the elementwise
    median over the queries.
    """
    if how == "mean":
        return scores.mean(0)
    if how == "topk_median":
        if topk is not None and topk < scores.shape[1]:
            top = scores.topk(topk, dim=1)
            scores = torch.zeros_like(scores).scatter_(1, top.indices, top.values)
        return _median(scores, dim=0)
    raise ValueError(f"unknown aggregate {how!r}; choose one of {AGGREGATES}")


def robust_z(s: torch.Tensor, mad_floor: float = 1e-3) -> torch.Tensor:
    """(s - median) / max(1.4826 * MAD, mad_floor * max|s - median|); all zeros when s is constant.

    The floor is relative to the scores' own scale (their largest deviation from the
    median), so z, and the weights made from it, do not change when every score is
    multiplied by a constant: dot products of a well-fitted model (~1e-10) weigh like
    cosines. It only matters when the MAD is degenerate (more than half the scores tied
    at the median), where it caps |z| at 1 / mad_floor; a warning says so.
    """
    med = _median(s)
    dev = (s - med).abs()
    largest = dev.max().item()
    if largest == 0:
        return torch.zeros_like(s)
    spread = 1.4826 * _median(dev).item()
    floor = mad_floor * largest
    if spread < floor:
        warnings.warn(
            f"robust_z: the scores' spread 1.4826*MAD = {spread:.3g} is below the floor {floor:.3g} "
            f"({mad_floor:g} x the largest deviation from the median): most scores are tied, so z is set by the "
            "floor; check that the scores are not mostly zeros (e.g. a top-k aggregate over few queries)",
            stacklevel=3,
        )
    return (s - med) / max(spread, floor)


class RapidUnWeights(NamedTuple):
    """forget: (Nf,) float32, retain: (Nr,) float32; each has mean 1."""

    forget: torch.Tensor
    retain: torch.Tensor


def rapidun(
    ff,
    fr,
    rf,
    rr,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    delta: float = 1.0,
    tau_f: float = 0.7,
    tau_r: float = 1.2,
    w_min: float = 0.2,
    w_max: float = 3.0,
    aggregate: str = "mean",
    topk: int | None = None,
) -> RapidUnWeights:
    """RapidUn forget and retain weights (arXiv 2512.04457).

        S_f = alpha * FF - beta * FR          (per forget-train example)
        S_r = gamma * RR - delta * RF         (per retain-train example)
        z = (S - median) / max(1.4826 * MAD, 1e-3 * max|S - median|)
        w = exp(clip(z / tau, ln w_min, ln w_max)),   w /= mean(w)

    FF, FR, RF, RR aggregate each matrix over its queries (``aggregate``: ``mean``, or
    RapidUn's ``topk_median`` with ``topk``). A constant S gives z = 0 (all weights 1).
    RapidUn floors the MAD at an absolute 1e-3, which sets every weight to 1 when the scores
    are tiny (dot products on a well-fitted model); the floor here is relative to the
    scores' scale (:func:`robust_z`), so the weights do not depend on it.

    Defaults follow the paper (tau_f=0.7, tau_r=1.2, w in [0.2, 3], mean aggregation of raw
    scores); RapidUn's released script defaults to tau=1, w_min 1.0 (forget) / 0.5
    (retain), and aggregates with the per-query top-k then median.

    Orientation: ScoreResults carry their query and train ids, and the four must agree on
    the sets they share (ff and rf: the forget queries; ff and fr: the forget train
    examples; ...): a matrix in another's place is refused. Plain tensors and arrays carry no
    ids, so only their shapes are checked, which cannot tell a transposed matrix from the
    right one when the shapes fit both ways (square matrices of equal-sized sets): pass the
    ScoreResults (``score(..., matrix=True)``) to have that caught.

    Returns:
        RapidUnWeights(forget (Nf,), retain (Nr,)), float32. Before the mean normalisation
        every weight lies in [w_min, w_max].
    """
    _check_rapidun_sets({"ff": ff, "fr": fr, "rf": rf, "rr": rr})
    ff, fr, rf, rr = (_matrix(n, m) for n, m in (("ff", ff), ("fr", fr), ("rf", rf), ("rr", rr)))
    (qf, nf), (qr, nr) = ff.shape, rr.shape
    expected = {"fr": (qr, nf), "rf": (qf, nr)}
    for name, m in (("fr", fr), ("rf", rf)):
        if tuple(m.shape) != expected[name]:
            raise ValueError(
                f"rapidun: {name} has shape {tuple(m.shape)}, expected {expected[name]}: ff is (Qf, Nf) = "
                f"{(qf, nf)} and rr is (Qr, Nr) = {(qr, nr)}, so fr must be (Qr, Nf) and rf (Qf, Nr)"
            )
    if not 0 < w_min <= w_max or tau_f <= 0 or tau_r <= 0:
        raise ValueError(
            f"rapidun: need 0 < w_min <= w_max and tau > 0, got w=[{w_min}, {w_max}], tau_f={tau_f}, tau_r={tau_r}"
        )
    FF, FR, RF, RR = (aggregate_scores(m, aggregate, topk) for m in (ff, fr, rf, rr))
    s_f = alpha * FF - beta * FR
    s_r = gamma * RR - delta * RF

    def to_weights(s, tau):
        w = torch.exp((robust_z(s) / tau).clamp(math.log(w_min), math.log(w_max)))
        return (w / w.mean()).float()

    return RapidUnWeights(to_weights(s_f, tau_f), to_weights(s_r, tau_r))


class ImuWeights(NamedTuple):
    """weights: (Nf,) float32, 0 for dropped examples, mean 1; influence: (Nf,) float64 I_i; keep: (Nf,) bool."""

    weights: torch.Tensor
    influence: torch.Tensor
    keep: torch.Tensor


def imu(
    forget_grads: torch.Tensor,
    retain_grads: torch.Tensor | None = None,
    keep_fraction: float = 1.0,
    cap_quantile: float = 0.93,
    damping: float = 0.01,
) -> ImuWeights:
    """IMU forget weights from last-layer (classifier) gradients (arXiv 2508.01620).

        F = mean_i g_i^2 + damping                  (diagonal Fisher)
        I_i = -(g_i / F) . mean_forget(g)
        keep I_i < 0, then the top ``keep_fraction`` of those by |I_i|
        w_i = min(sqrt|I_i|, quantile_q(sqrt|I_kept|))  for kept i, 0 otherwise

    Args:
        forget_grads: (Nf, D) per-example gradients of the LM head (exact, or projected
            features of ``ProjectionConfig(include=[r"lm_head"])``).
        retain_grads: (Nr, D) or None. When given, the Fisher is estimated on forget and
            retain together; IMU's code uses the forget set only (the default here too).
        keep_fraction: fraction of the negative-influence examples kept (at least one).
        cap_quantile: the weight cap's quantile (IMU: 0.93).

    Returns:
        ImuWeights. IMU's loss is -sum(w l) / sum(w); here the weights are scaled to mean 1
        over the forget set, so the mean of w * l over the whole set is the same loss.
    """
    g = _grads("forget_grads", forget_grads)
    if retain_grads is not None:
        r = _grads("retain_grads", retain_grads)
        if r.shape[1] != g.shape[1]:
            raise ValueError(
                f"imu: forget_grads has D={g.shape[1]} columns, retain_grads {r.shape[1]}; use the same layer"
            )
        fisher = torch.cat([g, r]).pow(2).mean(0) + damping
    else:
        fisher = g.pow(2).mean(0) + damping
    if not 0 < keep_fraction <= 1 or not 0 < cap_quantile <= 1:
        raise ValueError(f"imu: keep_fraction and cap_quantile must lie in (0, 1], got {keep_fraction}, {cap_quantile}")
    influence = -(g / fisher) @ g.mean(0)
    negative = torch.nonzero(influence < 0).squeeze(1)
    keep = torch.zeros(len(g), dtype=torch.bool)
    weights = torch.zeros(len(g), dtype=torch.float64)
    if len(negative):
        n_keep = max(int(len(negative) * keep_fraction), 1)
        order = torch.argsort(influence[negative].abs(), descending=True, stable=True)
        kept = negative[order[:n_keep]]
        w = influence[kept].abs().sqrt()
        weights[kept] = w.clamp(max=torch.quantile(w, cap_quantile).item())
        keep[kept] = True
        weights = weights / weights.mean()
    return ImuWeights(weights.float(), influence, keep)


def _grads(name: str, g) -> torch.Tensor:
    if isinstance(g, np.ndarray):
        g = _as_tensor(g)
    if not isinstance(g, torch.Tensor) or g.dim() != 2 or g.shape[0] == 0:
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"imu: {name} must be a non-empty (N, D) gradient matrix, got {shape}")
    if not torch.isfinite(g).all():
        raise ValueError(f"imu: {name} holds NaN or inf")
    return g.double().cpu()


class LowInfluence(NamedTuple):
    """skip: (N,) bool, examples that need no unlearning; keep: (M,) int64 indices of the rest;
    threshold: |influence| at or below which an example is skipped; compute_saved: fraction
    of the unlearning work (tokens when given, else examples) skipped."""

    skip: torch.Tensor
    keep: torch.Tensor
    threshold: float
    compute_saved: float


def low_influence(
    scores,
    quantile: float | None = None,
    threshold: float | None = None,
    tokens: torch.Tensor | None = None,
) -> LowInfluence:
    """Examples whose influence is negligible, so unlearning can skip them (arXiv 2512.05254).

    Call once for the forget set and once for the retain set.

    Args:
        scores: (N,) influence per train example, or a (Q, N) matrix / ScoreResult averaged
            over its queries.
        quantile: skip the examples whose |influence| is at or below this quantile of |influence|.
        threshold: or skip |influence| <= threshold. Give exactly one of the two.
        tokens: (N,) answer-token counts, so the saving is measured in tokens.
    """
    if (quantile is None) == (threshold is None):
        raise ValueError("low_influence: give exactly one of quantile= or threshold=")
    if isinstance(scores, np.ndarray):
        scores = _as_tensor(scores)
    s = (
        _matrix("scores", scores).mean(0)
        if not (isinstance(scores, torch.Tensor) and scores.dim() == 1)
        else scores.double()
    )
    if s.numel() == 0 or not torch.isfinite(s).all():
        raise ValueError("low_influence: scores must be non-empty and finite")
    mag = s.abs()
    if quantile is not None:
        if not 0 <= quantile <= 1:
            raise ValueError(f"low_influence: quantile must lie in [0, 1], got {quantile}")
        threshold = torch.quantile(mag, quantile).item()
    # quantile=0 asks to skip nothing (<= would still drop the smallest example).
    skip = torch.zeros_like(mag, dtype=torch.bool) if quantile == 0 else mag <= threshold
    cost = torch.ones_like(mag) if tokens is None else _as_tensor(tokens).double()
    if cost.shape != mag.shape:
        raise ValueError(f"low_influence: tokens must have shape {tuple(mag.shape)}, got {tuple(cost.shape)}")
    saved = (cost[skip].sum() / cost.sum()).item()
    return LowInfluence(skip, torch.nonzero(~skip).squeeze(1), float(threshold), saved)


def loss_reweight(losses: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Loss-based forget weights favouring hard-to-forget examples (LoReUn-style).

        w_i = N * softmax(-L_i / tau)

    A forget example the model still fits well (low loss L_i) is the hard one to forget, so
    it gets the larger weight; weights have mean 1. ``losses``: (N,) per-example forget
    losses (e.g. the mean answer-token NLL), recomputed as unlearning goes on.
    """
    losses = _as_tensor(losses).double()
    if losses.dim() != 1 or losses.numel() == 0 or not torch.isfinite(losses).all():
        raise ValueError(
            f"loss_reweight: losses must be a non-empty finite (N,) vector, got shape {tuple(losses.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"loss_reweight: tau must be positive, got {tau}")
    return (len(losses) * torch.softmax(-losses / tau, dim=0)).float()


# -- SIMU: neuron masks --------------------------------------------------------------------


class _AnswerNll:
    """SIMU's default loss: (B,) mean NLL over each example's answer tokens, with autograd; each batch
    warning logged once per instance (one ``simu_mask`` call)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        batch = prepare_batch(batch, model_device(model), 0, warned=self.warned)
        return forward_losses(model, batch, fused_head(model))


def neuron_attribution(model, batches: Iterable[dict], loss_fn) -> dict[str, torch.Tensor]:
    """Mean over examples of sum_t |a_tj * dL/da_tj| for every MLP neuron j, by block name.

    a is the input of the block's down-projection. ``loss_fn(model, batch)`` returns the
    (B,) per-example losses; padding is excluded because its gradient is zero. The fused
    experts of an MoE block (``moe.experts_modules``) count as one block per expert, named
    ``<experts module>.<e>`` (``model.layers.3.mlp.experts.7``): its neurons are the expert's
    intermediate units and its sum runs over the tokens routed to it (a_t, dL/da_t of the
    expert's own down projection, the routing weight included in the gradient).
    """
    blocks = mlp_blocks(model, required=not moe.experts_modules(model))
    acts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, (_, down) in blocks.items():

        def hook(module, args, name=name):
            args[0].retain_grad()
            acts[name] = args[0]

        hooks.append(down.register_forward_pre_hook(hook))
    totals = {name: 0.0 for name in blocks}
    count = 0
    try:
        with moe.expert_neuron_attribution(model) as experts:
            for batch in batches:
                losses = loss_fn(model, batch)
                model.zero_grad(set_to_none=True)
                losses.sum().backward()
                for name, a in acts.items():
                    totals[name] = totals[name] + (a.detach() * a.grad).abs().flatten(0, -2).sum(0).double()
                count += losses.shape[0]
                acts.clear()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("simu_mask: a batch iterable is empty; give at least one forget and one retain batch")
    totals.update(experts.totals)
    return {name: t / count for name, t in totals.items()}


def simu_mask(
    model: torch.nn.Module,
    forget_batches: Iterable[dict],
    retain_batches: Iterable[dict],
    forget_fraction: float = 0.1,
    retain_fraction: float = 0.1,
    dual: bool = False,
    loss_fn=None,
) -> dict[str, torch.Tensor]:
    """SIMU neuron masks (arXiv 2510.07822): which MLP neurons unlearning may update.

    Attribution of neuron j: mean over examples of sum over answer tokens |a_j * dL/da_j|,
    on the forget and on the retain set. Per block, a neuron is "forget-important" when it is
    in the top ``forget_fraction`` by forget attribution and "retain-important" in the top
    ``retain_fraction`` by retain attribution. Critical forget neurons are forget-important
    and not retain-important; ``dual=True`` adds the neurons important to both.

    MoE models: each expert of a fused experts module is a block of its own,
    ``<experts module>.<e>`` with its intermediate units as neurons (see
    :func:`neuron_attribution`), ranked within the expert; a neuron whose forget attribution is
    zero (an expert no forget token reaches) is never selected.

    Returns:
        {block name: (d_ff,) bool}, True = neuron is updated. Apply with
        :func:`fastinfluence.unlearn.apply_neuron_masks` (``UnlearnTrainer(simu_masks=...)``).
    """
    if not 0 < forget_fraction <= 1 or not 0 <= retain_fraction <= 1:
        raise ValueError(f"simu_mask: fractions must lie in (0, 1], got {forget_fraction}, {retain_fraction}")
    loss_fn = loss_fn or _AnswerNll()
    forget = neuron_attribution(model, forget_batches, loss_fn)
    retain = neuron_attribution(model, retain_batches, loss_fn)
    experts = {f"{name}.{e}" for name, m in moe.experts_modules(model).items() for e in range(m.down_proj.shape[0])}
    masks = {}
    for name, f in forget.items():
        top_f, top_r = _top(f, forget_fraction), _top(retain[name], retain_fraction)
        if name in experts:  # an expert the forget set never reaches has no forget-important neuron
            top_f &= f > 0
        masks[name] = top_f if dual else top_f & ~top_r
    return masks


def _top(x: torch.Tensor, fraction: float) -> torch.Tensor:
    k = round(fraction * len(x))
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[torch.argsort(x, descending=True, stable=True)[:k]] = True
    return mask
