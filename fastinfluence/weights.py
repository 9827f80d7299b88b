"""Per-example unlearning weights from influence scores (RapidUn, IMU, low-influence
skipping, SIMU neuron masks, loss-based reweighting).

Score matrices are oriented like ``ScoreResult``: rows are queries, columns train examples.
For unlearning with a forget set F and a retain set R, each split into queries (test) and
train examples:

    ff: (Qf, Nf) forget queries x forget train     fr: (Qr, Nf) retain queries x forget train
    rf: (Qf, Nr) forget queries x retain train     rr: (Qr, Nr) retain queries x retain train
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch

from . import moe
from .batching import prepare_batch
from .capture import forward_losses, model_device
from .lm import fused_head, mlp_blocks
from .options import RAPIDUN_AGGREGATES as AGGREGATES


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


ROWS = ("queries", "train")  # what the rows of a plain score matrix are (``rows=``)


def _plain(scores) -> bool:
    """True for a matrix that carries no query / train sides (a tensor or an array)."""
    return isinstance(scores, (torch.Tensor, np.ndarray)) or getattr(scores, "query_ids", None) is None


def _check_rows(fn: str, rows: str | None) -> None:
    if rows is not None and rows not in ROWS:
        raise ValueError(f"{fn}: rows must be one of {ROWS} (what a plain score matrix's rows are), got {rows!r}")


def _rapidun_fits(shapes: dict[str, tuple[int, int]]) -> bool:
    (qf, nf), (qr, nr) = shapes["ff"], shapes["rr"]
    return shapes["fr"] == (qr, nf) and shapes["rf"] == (qf, nr)


def _oriented(given: dict, rows: str | None) -> dict[str, torch.Tensor]:
    """RapidUn's four (queries, train) matrices, their orientation checked: ids where they carry
    them, shapes otherwise, and refused when plain matrices' shapes fit another orientation too."""
    _check_rows("rapidun", rows)
    _check_rapidun_sets(given)
    mats = {n: _matrix(n, m) for n, m in given.items()}
    plain = [n for n, m in given.items() if _plain(m)]
    if rows == "train":
        mats.update({n: mats[n].T for n in plain})
    shapes = {n: tuple(m.shape) for n, m in mats.items()}
    if rows is None and plain:
        fits = [
            flips
            for flips in itertools.product((False, True), repeat=len(plain))
            if _rapidun_fits(shapes | {n: shapes[n][::-1] for n, f in zip(plain, flips) if f})
        ]
        if len(fits) > 1:
            raise ValueError(
                "rapidun: the shapes of the plain matrices "
                f"({', '.join(f'{n} {shapes[n]}' for n in plain)}) fit more than one orientation, so a transposed "
                "matrix cannot be told from the right one: pass rows='queries' (rows are queries, as score() returns "
                "them) or rows='train', or the ScoreResults (score(..., matrix=True))"
            )
    (qf, nf), (qr, nr) = shapes["ff"], shapes["rr"]
    expected = {"fr": (qr, nf), "rf": (qf, nr)}
    for name in ("fr", "rf"):
        if shapes[name] != expected[name]:
            raise ValueError(
                f"rapidun: {name} has shape {shapes[name]}, expected {expected[name]}: ff is (Qf, Nf) = "
                f"{(qf, nf)} and rr is (Qr, Nr) = {(qr, nr)}, so fr must be (Qr, Nf) and rf (Qf, Nr)"
                + ("" if rows else "; if the plain matrices are (train, queries), pass rows='train'")
            )
    return mats


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
    rows: str | None = None,
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
    ids: their shapes are checked, and where the shapes fit more than one orientation (a
    square matrix, or Qf = Qr with Nf = Nr) they cannot tell a transposed matrix from the
    right one, so such input is refused unless ``rows`` names what the plain matrices' rows
    are: ``"queries"`` (``score``'s orientation) or ``"train"`` (transposed; they are
    transposed back). ScoreResults are always read by their own query / train sides.

    Returns:
        RapidUnWeights(forget (Nf,), retain (Nr,)), float32. Before the mean normalisation
        every weight lies in [w_min, w_max].
    """
    ff, fr, rf, rr = _oriented({"ff": ff, "fr": fr, "rf": rf, "rr": rr}, rows).values()
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
    rows: str | None = None,
) -> LowInfluence:
    """Examples whose influence is negligible, so unlearning can skip them (arXiv 2512.05254).

    Call once for the forget set and once for the retain set.

    Args:
        scores: (N,) influence per train example, or a (Q, N) matrix / ScoreResult averaged
            over its queries.
        quantile: skip the examples whose |influence| is at or below this quantile of |influence|.
        threshold: or skip |influence| <= threshold. Give exactly one of the two.
        tokens: (N,) answer-token counts, so the saving is measured in tokens.
        rows: what a plain (Q, N) matrix's rows are: ``"queries"`` (``score``'s orientation)
            or ``"train"`` (a transposed one). A square plain matrix, whose shape cannot tell,
            is refused without it, and so is a plain matrix whose shape only fits ``tokens``
            transposed.
    """
    if (quantile is None) == (threshold is None):
        raise ValueError("low_influence: give exactly one of quantile= or threshold=")
    if isinstance(scores, np.ndarray):
        scores = _as_tensor(scores)
    _check_rows("low_influence", rows)
    if isinstance(scores, torch.Tensor) and scores.dim() == 1:
        s = scores.double()
    else:
        m = _matrix("scores", scores)
        if _plain(scores):
            m = m.T if rows == "train" else m
            _check_low_influence_rows(tuple(m.shape), rows, tokens)
        s = m.mean(0)
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


def _check_low_influence_rows(shape: tuple[int, int], rows: str | None, tokens) -> None:
    if rows is not None:
        return
    q, n = shape
    hint = "pass rows='queries' (rows are queries, as score() returns them) or rows='train', or the ScoreResult"
    if q == n:
        raise ValueError(
            f"low_influence: the plain score matrix is square {shape}, so its queries cannot be told from its train "
            f"examples: {hint}"
        )
    if tokens is not None and len(tokens) == q != n:
        raise ValueError(
            f"low_influence: tokens has {q} entries, the rows of the {shape} score matrix, not its {n} columns (the "
            f"train examples): is the matrix (train, queries)? {hint}"
        )


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


# -- The hand-off to unlearning: one weights file, one loader ------------------------------
#
# A skipped (low-influence) forget example is DROPPED from the forget set, not given weight 0.
# Its loss term is zero either way, but a zero-weight example still takes a batch slot, a
# forward and a backward every epoch (the compute skipping exists to save), and under the
# mean reductions (weight_norm="mean", reduction="token") it still counts in the batch's
# denominator, so every kept example's step shrinks by (kept in batch) / (batch). Dropped,
# the kept examples are batched together and each batch's mean is over them alone; each
# kept example is still paired with ``ratio`` retain examples. A weight of 0 in ``forget``
# (IMU's non-kept examples) stays a weight: that example is batched with loss term 0.

WEIGHTS_SUFFIXES = (".json", ".pt", ".pth", ".npy")
_JSON_KEYS = ("forget", "retain", "keep")


class Selection(NamedTuple):
    """The forget examples to unlearn and their weights, as an unlearning dataset takes them.

    keep: indices into the forget set, ascending; forget: (len(keep),) float32 weights of
    those examples or None (all 1); retain: (Nr,) float32 or None (all 1)."""

    keep: list[int]
    forget: torch.Tensor | None
    retain: torch.Tensor | None


class UnlearnWeights(NamedTuple):
    """What scores hand to unlearning (the file ``fastinfluence weights`` writes).

    forget: (Nf,) float32 weights of every forget example, or None (all 1). retain: (Nr,)
    float32, or None. keep: (K,) int64 ascending indices of the forget examples unlearned,
    or None (all of them); the others are skipped, i.e. dropped from the forget set (see
    the comment above). n_forget: the forget-set size ``keep`` was made for (the file's
    ``n``), None when it does not say."""

    forget: torch.Tensor | None = None
    retain: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    n_forget: int | None = None

    def check(self, n_forget: int, n_retain: int | None = None, source: str = "the weights") -> list[int]:
        """The kept forget indices, after checking the weights fit a forget set of ``n_forget``
        examples (and a retain set of ``n_retain`` when given); one-line ValueError otherwise."""
        hint = "compute the weights on the same split, in the same order"
        if self.n_forget is not None and self.n_forget != n_forget:
            raise ValueError(
                f"{source} was made for {self.n_forget} forget examples but the forget set has {n_forget}; {hint}"
            )
        for name, w, n in (("forget", self.forget, n_forget), ("retain", self.retain, n_retain)):
            if w is not None and n is not None and len(w) != n:
                raise ValueError(f"{source} has {len(w)} {name} weights but the {name} set has {n}; {hint}")
        if self.keep is None:
            return list(range(n_forget))
        keep = self.keep.tolist()
        if any(not 0 <= i < n_forget for i in keep):
            raise ValueError(f"{source} keeps forget example {max(keep)} but the forget set has {n_forget}; {hint}")
        if not keep:
            raise ValueError(f"{source} skips every forget example: lower the low_influence quantile or threshold")
        return keep

    def select(self, n_forget: int, n_retain: int | None = None, source: str = "the weights") -> Selection:
        """The kept forget indices with their weights (:meth:`check` first)."""
        keep = self.check(n_forget, n_retain, source)
        forget = None if self.forget is None else self.forget[torch.as_tensor(keep, dtype=torch.long)]
        return Selection(keep, forget, self.retain)

    def to_json(self, **info) -> dict:
        """The file's JSON object: ``forget``, ``retain``, ``keep`` + ``n`` (those present), then ``info``."""
        out: dict = {}
        for name in ("forget", "retain"):
            w = getattr(self, name)
            if w is not None:
                out[name] = w.tolist()
        if self.keep is not None:
            n = self.n_forget if self.n_forget is not None else (len(self.forget) if self.forget is not None else None)
            out["keep"] = self.keep.tolist()
            if n is not None:
                out["n"] = int(n)
        return out | info


def _weight_vector(source: str, name: str, w) -> torch.Tensor:
    """A (N,) float32 vector of finite non-negative weights, or a one-line ValueError."""
    try:
        t = torch.as_tensor(np.asarray(w, dtype=np.float64) if not isinstance(w, torch.Tensor) else w)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: '{name}' must be a list of numbers, one weight per example") from None
    if t.dim() != 1 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(
            f"{source}: '{name}' must be a 1-D vector of weights, one per example, got shape {tuple(t.shape)}"
        )
    t = t.double()
    if not torch.isfinite(t).all() or (t < 0).any():
        bad = t[~torch.isfinite(t) | (t < 0)][:3].tolist()
        raise ValueError(
            f"{source}: '{name}' weights must be finite and non-negative (the method gives each term its sign); "
            f"found {bad}"
        )
    return t.float()


def unlearn_weights(
    forget=None, retain=None, keep=None, n_forget: int | None = None, source: str = "weights"
) -> UnlearnWeights:
    """Checked :class:`UnlearnWeights` from vectors (tensors, arrays or lists) and a keep list."""
    f = None if forget is None else _weight_vector(source, "forget", forget)
    r = None if retain is None else _weight_vector(source, "retain", retain)
    k = None
    if keep is not None:
        try:
            k = torch.as_tensor(keep if isinstance(keep, torch.Tensor) else list(keep))
        except (TypeError, ValueError):
            raise ValueError(f"{source}: 'keep' must be a list of forget-example indices") from None
        if k.dim() != 1 or (k.numel() and k.is_floating_point()) or (k.numel() and (k < 0).any()):
            raise ValueError(f"{source}: 'keep' must be a list of non-negative forget-example indices")
        k = k.long()
        if len(torch.unique(k)) != len(k):
            raise ValueError(f"{source}: 'keep' lists a forget example twice; list each kept index once")
        k = k.sort().values
    if n_forget is not None and (isinstance(n_forget, bool) or not isinstance(n_forget, int) or n_forget < 0):
        raise ValueError(f"{source}: 'n' must be the forget-set size, a non-negative integer; got {n_forget!r}")
    if f is not None and k is not None:
        n = len(f) if n_forget is None else n_forget
        if len(f) != n:
            raise ValueError(f"{source}: 'keep' indexes {n} forget examples but 'forget' has {len(f)} weights")
    return UnlearnWeights(f, r, k, n_forget)


def load_weights(path) -> UnlearnWeights:
    """The unlearning weights in ``path``: the JSON ``fastinfluence weights`` writes (``forget``,
    ``retain``, low-influence ``keep`` with ``n``; other keys are ignored), or a ``.pt`` /
    ``.npy`` (N,) vector of forget weights. Anything else: a one-line ValueError naming the
    file and the fix (FileNotFoundError when it does not exist)."""
    from pathlib import Path

    p = Path(path)
    write = f"write it with `fastinfluence weights ... --out {p.name}` or weights.save_weights"
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist; {write}")
    suffix = p.suffix.lower()
    if suffix not in WEIGHTS_SUFFIXES:
        raise ValueError(
            f"weights file {p}: give a .json (as `fastinfluence weights` writes) or a .pt / .npy vector of "
            f"forget weights, not {suffix or 'a file without extension'}"
        )
    if suffix != ".json":
        try:
            if suffix == ".npy":
                w = np.load(p, allow_pickle=False)
            else:
                w = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # numpy / torch raise many types for a file that is not theirs
            raise ValueError(f"weights file {p} cannot be read as {suffix} ({type(exc).__name__}); {write}") from None
        if not isinstance(w, (torch.Tensor, np.ndarray)):
            raise ValueError(f"weights file {p} must hold one (N,) tensor of forget weights, found {type(w).__name__}")
        return unlearn_weights(forget=w, source=f"weights file {p}")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"weights file {p} is not valid JSON ({exc}); {write}") from None
    if not isinstance(data, dict) or not set(_JSON_KEYS) & set(data):
        raise ValueError(f"weights file {p} holds none of 'forget', 'retain', 'keep'; {write}")
    if "keep" in data and data["keep"] is None:
        raise ValueError(f"weights file {p}: 'keep' is null; drop the key to unlearn every forget example")
    return unlearn_weights(data.get("forget"), data.get("retain"), data.get("keep"), data.get("n"), f"weights file {p}")


def save_weights(path, weights: UnlearnWeights, **info) -> None:
    """Write ``weights`` to ``path`` as the JSON :func:`load_weights` reads (atomically); ``info``
    (``method``, ``threshold``, ...) is stored beside them and ignored by the loader."""
    from pathlib import Path

    from .outputs import write_text

    clash = set(info) & {*_JSON_KEYS, "n"}
    if clash:
        raise ValueError(f"save_weights: {sorted(clash)} are the weights' own keys; pass them in UnlearnWeights")
    write_text(Path(path), json.dumps(weights.to_json(**info)))
