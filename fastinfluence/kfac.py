"""K-FAC and EK-FAC influence over the full layer dimensions, scored without per-example gradients.

For a captured layer with inputs a~ (a, with a constant 1 appended when its bias is captured;
d_in' = d_in + bias) and output gradients g, over N fit examples holding T tokens in all:

    C_A = (1 / T) sum_{i,t} a~_it a~_it^T     (d_in', d_in'), per token
    C_G = (1 / N) sum_{i,t} g_it g_it^T       (d_out, d_out), per example

so that C_G (x) C_A has the scale of the per-example Fisher E_i[vec dW_i vec dW_i^T] (the
scale of the projected ``kfac`` in ``precondition.py``). With C_A = Q_A diag(e_A) Q_A^T and
C_G = Q_G diag(e_G) Q_G^T, a query gradient dW_q (d_out, d_in') is preconditioned as

    P_q = Q_G [(Q_G^T dW_q Q_A) / D] Q_A^T          (elementwise division)

    kfac:   D = (e_G + l_G) (e_A + l_A)^T        i.e. (C_G + l_G I)^-1 dW_q (C_A + l_A I)^-1
    ekfac:  D = Lambda + l,  Lambda = mean_i (Q_G^T dW_i Q_A)^2   (fitted in the eigenbasis)

with l = ``damping_ratio`` (0.1) x the mean eigenvalue of what it damps (each factor for kfac,
Lambda for ekfac), or an absolute ``damping``. No (d_out d_in')^2 matrix ever exists.

Each train example then scores <P_q, dW_i> = sum_t g_it^T P_q a~_it from its captured factors:
``dense`` forms the gradients of a few examples of one layer at a time (cost (T + Q) d_in' d_out
per example) and drops them; ``ghost`` never forms them (cost Q T d_in' d_out); ``auto`` takes
the cheaper per layer. The EK-FAC fit forms rotated per-example gradients the same way, a few
examples of one layer at a time.

An MoE expert (``moe.ExpertLayer``) is handed over as its routed tokens; laid out per example
(``ops.routed.token_grid``) they are factors like any layer's, with T its routed tokens: C_A is
divided by their count, C_G by the fit examples, and dW_i sums example i's routed tokens only.
Factors may be stored in a lower precision (``fit_kfac(factor_dtype=)``) and are then applied in
float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import distributed as dist
from . import errors
from .batching import Batch
from .capture import CapturePass, Layer, PairScorer, pairwise_scores, progress_bar
from .config import ProjectionConfig
from .ops._common import augmented, example_chunks, masked
from .ops.routed import token_grid
from .options import KFAC_METHODS as METHODS
from .options import KFAC_PRODUCTS as PRODUCTS
from .options import check_damping

FACTOR_DTYPES = {
    str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}


def _gradients(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """(B, d_out, d_in') per-example gradients sum_t g_t a~_t^T of (masked, augmented) factors."""
    return torch.einsum("bto,bti->boi", G, A)


def _on_grid(layer: Layer, A, G, mask, B: int):
    """(A (B, T, d_in), G (B, T, d_out), mask (B, T)) of a batch of B examples: a routed layer's
    (n, d) rows and their examples laid out per example (``ops.routed.token_grid``), so that every
    per-example quantity below holds for an expert as for a token-wise layer."""
    return token_grid(A, G, mask, B) if layer.routed else (A, G, mask)


def _factor_dtype(factor_dtype) -> torch.dtype:
    name = str(factor_dtype).removeprefix("torch.")
    if name not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {factor_dtype!r}")
    return FACTOR_DTYPES[name]


def _values_dtype(factor_dtype: torch.dtype) -> torch.dtype:
    """Eigenvalues and Lambda: float16's range (down to 6e-8) would flush small ones to 0, so float32 there."""
    return torch.float32 if factor_dtype == torch.float16 else factor_dtype


@dataclass
class KFACFactors:
    """Fitted K-FAC / EK-FAC statistics of some layers; ``precondition`` applies them.

    Attributes:
        method: ``kfac`` or ``ekfac``.
        shapes: layer name -> (d_out, d_in') of its gradient (d_in' counts the bias column).
        stats: "<layer>.<name>" -> tensor: ``Q_A`` (d_in', d_in'), ``Q_G`` (d_out, d_out),
            ``e_A`` (d_in',), ``e_G`` (d_out,) (eigenvalues of C_A, C_G), and for ekfac
            ``Lambda`` (d_out, d_in'); float64, or as ``fit_kfac(factor_dtype=)`` stored them.
        damping: absolute damping, or None for ``damping_ratio`` x mean eigenvalue.
        examples, tokens: how many examples and attended tokens the fit saw.
    """

    method: str
    shapes: dict[str, tuple[int, int]]
    stats: dict[str, torch.Tensor]
    damping: float | None = None
    damping_ratio: float = 0.1
    examples: int = 0
    tokens: int = 0

    def _damp(self, eigenvalues: torch.Tensor) -> float:
        if self.damping is not None:
            return self.damping
        damping = self.damping_ratio * float(eigenvalues.double().mean())
        # Zero statistics (a layer the fit data never moves) score 0 whatever the damping;
        # any positive value keeps the division finite.
        return damping if damping > 0 and math.isfinite(damping) else 1.0

    def denominator(self, name: str) -> torch.Tensor:
        """(d_out, d_in') float64 D of the module docstring for layer ``name``."""
        s = lambda k: self.stats[f"{name}.{k}"].double()  # noqa: E731
        if self.method == "kfac":
            return torch.outer(s("e_G") + self._damp(s("e_G")), s("e_A") + self._damp(s("e_A")))
        return s("Lambda") + self._damp(s("Lambda"))

    @property
    def dtype(self) -> torch.dtype:
        """What the eigenvectors are stored in (``fit_kfac(factor_dtype=)``)."""
        return next(v.dtype for k, v in self.stats.items() if k.endswith(".Q_A"))

    def precondition(self, name: str, dW: torch.Tensor) -> torch.Tensor:
        """dW: (Q, d_out, d_in') query gradients of layer ``name`` -> (Q, d_out, d_in') P_q, computed
        in float64 from float64 factors, in float32 from factors stored in a lower precision."""
        if tuple(dW.shape[1:]) != self.shapes[name]:
            raise ValueError(
                f"layer {name}: gradients of shape {tuple(dW.shape[1:])}, factors fitted for {self.shapes[name]}"
            )
        QA = self.stats[f"{name}.Q_A"]
        work = torch.float64 if QA.dtype == torch.float64 else torch.float32
        QA, QG = QA.to(dW.device, work), self.stats[f"{name}.Q_G"].to(dW.device, work)
        M = (QG.T @ dW.to(work) @ QA) / self.denominator(name).to(dW.device, work)
        return QG @ M @ QA.T

    def save(self, path: str | Path) -> None:
        """Write the statistics as safetensors, in the dtype they are held in (``KFACFactors.load``
        reads them back)."""
        meta = {
            "method": self.method,
            "shapes": json.dumps(self.shapes),
            "examples": str(self.examples),
            "tokens": str(self.tokens),
        }
        save_file({k: v.contiguous().cpu() for k, v in self.stats.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, damping: float | None = None, damping_ratio: float = 0.1) -> KFACFactors:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("method") not in METHODS:
                raise ValueError(f"{path} holds no K-FAC factors (metadata {meta}); write them with KFACFactors.save")
            stats = {k: f.get_tensor(k) for k in f.keys()}
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
        return cls(meta["method"], shapes, stats, damping, damping_ratio, int(meta["examples"]), int(meta["tokens"]))


def _check_damping(damping: float | None, damping_ratio: float) -> None:
    check_damping(damping)
    if not (damping_ratio > 0 and math.isfinite(damping_ratio)):
        raise errors.FastInfluenceError(
            f"{errors.name('damping_ratio')} must be positive and finite, got {damping_ratio}", "damping_ratio"
        )


def _warn_if_underdetermined(layers: list[Layer], examples: int, tokens: int, counts: dict[str, int]) -> None:
    """``counts``: the tokens each layer saw (all attended tokens; an expert's routed tokens)."""
    wide = [l for l in layers if counts[l.name] < max(l.d_in + int(l.bias), l.d_out)]
    if wide:
        width = max(max(l.d_in + int(l.bias), l.d_out) for l in wide)
        experts = [counts[l.name] for l in wide if l.routed]
        routed = f"; an expert sees only the tokens routed to it (as few as {min(experts)} here)" if experts else ""
        warnings.warn(
            f"K-FAC fit on {examples} examples ({tokens} attended tokens) for layers up to {width} wide "
            f"({len(wide)} of {len(layers)} layers, e.g. {wide[0].name}): a covariance of rank at most {tokens} "
            f"cannot describe {width} dimensions and damping decides the rest{routed}; fit on at least {width} "
            "tokens (more examples), or use the projected kfac of score(precondition='kfac') on a store",
            stacklevel=4,
        )


def _fit(
    capture: CapturePass,
    batches: Iterable[dict],
    method: str,
    damping,
    damping_ratio,
    progress: bool = False,
    factor_dtype: torch.dtype = torch.float64,
) -> KFACFactors:
    """The factors, one layer at a time beyond what the passes need at once: each layer's covariance
    sums are freed as its eigendecomposition is taken, and its factors go to the CPU in
    ``factor_dtype`` at once; the EK-FAC pass then holds the bases in the compute dtype (the stored,
    rounded ones) and one Lambda per layer."""
    layers, device, dtype = capture.layers, capture.device, capture.dtype
    sums: dict[str, list] = {l.name: [0.0, 0.0] for l in layers}
    routed = {l.name: 0 for l in layers if l.routed}
    examples = tokens = 0

    def covariances(layer: Layer, A, G, mask):
        # one batch's sums in the compute dtype, accumulated across batches in float64
        if layer.routed:  # (n, d) routed tokens: every row is an attended token of this expert
            routed[layer.name] += len(mask)
            a = torch.cat([A.to(dtype), A.new_ones(len(A), 1, dtype=dtype)], 1) if layer.bias else A.to(dtype)
            g = G.to(dtype)
        else:
            a = augmented(A.to(dtype), mask, layer.bias).flatten(0, 1)
            g = masked(G.to(dtype), mask).flatten(0, 1)
        s = sums[layer.name]
        for k, x in enumerate((a, g)):
            xx = (x.T @ x).double()
            s[k] = xx if isinstance(s[k], float) else s[k].add_(xx)

    with progress_bar("K-FAC factors" if progress else None) as bar:
        for step in capture.batches(batches, shared=True):
            if step.wanted:
                capture.backward(step.batch, covariances)
                if bar is not None:
                    bar(step.wanted)
            examples += step.batch.input_ids.shape[0]
            tokens += int(step.batch.attention_mask.bool().sum())
    counts = {l.name: tokens for l in layers}
    for name, n in routed.items():  # each rank counted the tokens of the batches it captured
        counts[name] = int(dist.all_reduce_sum(torch.tensor(n, device=device)))
    _warn_if_underdetermined(layers, examples, tokens, counts)
    values = _values_dtype(factor_dtype)
    stats, shapes = {}, {}
    for layer in layers:
        d_in = layer.d_in + int(layer.bias)
        CA, CG = (dist.all_reduce_sum(_zeros(n, s, device)) for n, s in zip((d_in, layer.d_out), sums.pop(layer.name)))
        # An expert no token reaches has zero sums: zero factors, which score 0.
        eA, QA = torch.linalg.eigh(CA.div_(max(counts[layer.name], 1)))
        del CA
        eG, QG = torch.linalg.eigh(CG.div_(examples))
        del CG
        # contiguous: eigh returns column-major bases
        stats.update(
            {
                f"{layer.name}.Q_A": QA.to("cpu", factor_dtype).contiguous(),
                f"{layer.name}.Q_G": QG.to("cpu", factor_dtype).contiguous(),
                f"{layer.name}.e_A": eA.to("cpu", values),
                f"{layer.name}.e_G": eG.to("cpu", values),
            }
        )
        del QA, QG, eA, eG
        shapes[layer.name] = (layer.d_out, d_in)
    if method == "ekfac":
        # The bases as stored (rounded to factor_dtype), so that Lambda is the diagonal in the basis
        # the scores use; the same tensors as the factors for a float32 model's float32 factors on a CPU.
        bases = {
            l.name: (stats[f"{l.name}.Q_G"].to(device, dtype), stats[f"{l.name}.Q_A"].to(device, dtype)) for l in layers
        }
        lam: dict[str, torch.Tensor] = {}

        def eigenbasis_squares(layer: Layer, A, G, mask, B: int):
            QG, QA = bases[layer.name]
            A, G, mask = _on_grid(layer, A, G, mask, B)
            # Rotating the factors first costs T (d_in'^2 + d_out^2) per example instead of
            # rotating each gradient (d_out d_in' (d_out + d_in')).
            a = augmented(A.to(dtype), mask, layer.bias) @ QA
            g = masked(G.to(dtype), mask) @ QG
            if layer.name not in lam:
                lam[layer.name] = torch.zeros(shapes[layer.name], dtype=torch.float64, device=device)
            for rows in example_chunks(a.shape[0], *shapes[layer.name]):
                lam[layer.name] += _gradients(a[rows], g[rows]).square().sum(0).double()

        def start(batch: Batch):
            return lambda layer, A, G, mask: eigenbasis_squares(layer, A, G, mask, batch.input_ids.shape[0])

        capture.run(batches, start, "EK-FAC eigenvalues" if progress else None, shared=True)
        del bases
        for layer in layers:
            v = lam.pop(layer.name, None)
            v = torch.zeros(shapes[layer.name], dtype=torch.float64, device=device) if v is None else v
            stats[f"{layer.name}.Lambda"] = (dist.all_reduce_sum(v) / examples).to("cpu", values)
    return KFACFactors(method, shapes, stats, damping, damping_ratio, examples, tokens)


def _zeros(n: int, total, device) -> torch.Tensor:
    """(n, n) float64 ``total``: a rank that captured no batch holds 0.0."""
    return total if torch.is_tensor(total) else torch.zeros(n, n, dtype=torch.float64, device=device)


def fit_kfac(
    model: nn.Module,
    batches: Iterable[dict],
    method: str = "ekfac",
    config: ProjectionConfig | None = None,
    damping: float | None = None,
    damping_ratio: float = 0.1,
    progress: bool = False,
    factor_dtype: torch.dtype | str = torch.float64,
) -> KFACFactors:
    """Fit full-dimension K-FAC (one pass over ``batches``) or EK-FAC (two passes) factors.

    ``batches``: HF-style batch dicts (a re-iterable such as a list or DataLoader for ekfac);
    ``config`` selects the layers as for ``exact_scores``; ``progress``: a bar per pass, in
    examples. The model is left unchanged. A fit on fewer attended tokens than a layer is wide
    warns: its covariance cannot have full rank, and damping alone decides most directions.

    ``factor_dtype``: what the factors are stored (and saved) in: ``float64`` (the default),
    ``float32``, ``bfloat16`` or ``float16`` (a half or a quarter of the memory and file size of
    float64; float16 keeps the eigenvalues and Lambda in float32, whose small values its range would
    flush to zero). The fit computes in float64 and float32 as ever; lower-precision factors are
    applied in float32, and the EK-FAC Lambda is fitted in the rounded eigenbasis.

    Memory: one layer's covariance sums are turned into its factors at a time (and freed), the
    factors going to the CPU at once; the EK-FAC pass holds every layer's bases in the compute
    dtype on the model's device.

    MoE experts (``moe.ExpertLayer``) get factors of their own: C_A over the tokens routed to the
    expert (divided by their count), C_G summed over them per fit example (divided by the number of
    examples), and EK-FAC's Lambda from each example's gradient of the expert, sum over its routed
    tokens of g a~^T; an example that routes no token to it adds zero.

    Under ``torch.distributed`` every rank passes the same batches; the ranks capture every
    ``world``-th batch each and sum their statistics, so every rank gets the same factors (on an
    FSDP2-sharded model as on whole copies: ``sharding``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_damping(damping, damping_ratio)
    if method == "ekfac" and iter(batches) is batches:
        raise ValueError("ekfac reads the fit batches twice: pass a list or DataLoader, not a one-shot iterator")
    factor_dtype = _factor_dtype(factor_dtype)
    capture = CapturePass(model, config)
    return _fit(capture, batches, method, damping, damping_ratio, progress, factor_dtype)


def _train_product(product: str, Q: int, T: int) -> str:
    if product != "auto":
        return product
    # per example: ghost Q T d_in' d_out, dense (T + Q) d_in' d_out
    return "ghost" if Q * T <= T + Q else "dense"


def kfac_scores(
    model: nn.Module,
    query_batches: Iterable[dict],
    train_batches: Iterable[dict],
    method: str = "ekfac",
    fit_batches: Iterable[dict] | None = None,
    config: ProjectionConfig | None = None,
    metric: str = "dot",
    damping: float | None = None,
    damping_ratio: float = 0.1,
    factors: KFACFactors | None = None,
    product: str = "auto",
    progress: bool = False,
    factor_dtype: torch.dtype | str = torch.float64,
) -> torch.Tensor:
    """Full-dimension K-FAC / EK-FAC influence of every train example on every query.

        scores = fastinfluence.kfac_scores(model, query_batches, train_batches)   # (Q, N), EK-FAC

    Args:
        model: a causal LM (left unchanged).
        query_batches, train_batches: HF-style batch dicts, as for ``exact_scores``.
        method: ``ekfac`` (eigenvalue-corrected) or ``kfac``.
        fit_batches: what the factors are fitted on (default: ``train_batches``, which must then
            be re-iterable: a list or DataLoader).
        config: selects the layers (``include`` / ``exclude`` / ``include_bias``) as for
            ``exact_scores``; the ranks are ignored.
        metric: ``dot`` (<H^-1 grad_q, grad_i>) or ``cosine`` (divided by ||H^-1 grad_q|| ||grad_i||),
            with norms over all selected layers, as ``score`` does.
        damping, damping_ratio: absolute damping, or the ratio to the mean eigenvalue (0.1);
            with ``factors``, values other than these defaults override the factors' own.
        factors: already fitted ``KFACFactors`` (``fit_kfac``) for these layers; then nothing is
            fitted and ``method`` is the factors' own.
        product: how train examples are scored, ``auto``, ``dense`` or ``ghost`` (module docstring).
        progress: show a bar (in examples) for each pass: the fit, the queries, the train examples.
        factor_dtype: what fitted factors are held in (``fit_kfac``); not used with ``factors``.

    Returns:
        (Q, N) scores, float64 for a float64 model, float32 otherwise, summed over layers; rows and
        columns in data order (length-bucketed batches with ``positions`` are put back in order).
    """
    if metric not in ("dot", "cosine"):
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_damping(damping, damping_ratio)
    factor_dtype = _factor_dtype(factor_dtype)
    capture = CapturePass(model, config)
    if factors is None:
        if fit_batches is None and iter(train_batches) is train_batches:
            raise ValueError(
                "train_batches are read again after fitting: pass a list or DataLoader, or give fit_batches or factors"
            )
        fit_on = train_batches if fit_batches is None else fit_batches
        if method == "ekfac" and iter(fit_on) is fit_on:
            raise ValueError("ekfac reads the fit batches twice: pass a list or DataLoader, not a one-shot iterator")
        factors = _fit(capture, fit_on, method, damping, damping_ratio, progress, factor_dtype)
    else:
        missing = [l.name for l in capture.layers if l.name not in factors.shapes]
        if missing:
            raise ValueError(f"factors were fitted without layers {missing[:3]}: fit them with the same config")
        if damping is not None or damping_ratio != 0.1:
            factors = dataclasses.replace(factors, damping=damping, damping_ratio=damping_ratio)
    scorer = _KFACScorer(capture, metric == "cosine", factors, product)
    return pairwise_scores(capture, query_batches, train_batches, scorer, progress)


class _KFACScorer(PairScorer):
    """Query gradients preconditioned once (``KFACFactors.precondition``), train examples scored
    against them from their captured factors (module docstring: ``dense`` / ``ghost``)."""

    def __init__(self, capture: CapturePass, cosine: bool, factors: KFACFactors, product: str):
        super().__init__(cosine)
        self.dtype, self.factors, self.product = capture.dtype, factors, product
        self.grads: dict[str, list[torch.Tensor]] = {l.name: [] for l in capture.layers}
        self.P: dict[str, torch.Tensor] = {}

    def query(self, batch: Batch):
        B = batch.input_ids.shape[0]

        def keep(layer: Layer, A, G, mask):
            A, G, mask = _on_grid(layer, A, G, mask, B)
            a, g = augmented(A.to(self.dtype), mask, layer.bias), masked(G.to(self.dtype), mask)
            self.grads[layer.name].append(_gradients(a, g))

        return keep

    def queries_done(self):
        self.P = {n: self.factors.precondition(n, torch.cat(g)).to(self.dtype) for n, g in self.grads.items()}
        self.grads = {}  # free the query gradients
        return sum(p.flatten(1).square().sum(1) for p in self.P.values())

    def train(self, S, sq):
        def score(layer: Layer, A, G, mask):
            A, G, mask = _on_grid(layer, A, G, mask, S.shape[1])
            a, g = augmented(A.to(self.dtype), mask, layer.bias), masked(G.to(self.dtype), mask)
            Pq = self.P[layer.name]
            if _train_product(self.product, Pq.shape[0], a.shape[1]) == "ghost":
                for b in range(a.shape[0]):  # (Q, d_out, T): P_q a~_t for every token
                    S[:, b] += torch.einsum("qot,to->q", Pq @ a[b].T, g[b])
                if sq is not None:
                    sq.add_((a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum((1, 2)))
                return
            flat = Pq.flatten(1)
            for rows in example_chunks(a.shape[0], *Pq.shape[1:]):
                W = _gradients(a[rows], g[rows]).flatten(1)
                S[:, rows] += flat @ W.T
                if sq is not None:
                    sq[rows] += W.square().sum(1)

        return score
