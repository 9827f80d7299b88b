"""Exact per-example gradient inner products: the gold standard projections are measured against.

For each selected layer, one of two exact methods is used, whichever costs less:

- ``ghost``: sum_{t,s} (a_qt . a_is)(g_qt . g_is) from stored query factors
  (``ops.ghost_dot``), about Q T_q T_i (d_in + d_out) per train example;
- ``dense``: the query gradients grad W_q are formed once and each train example's
  gradient is formed and dotted with them, about (T_i + Q) d_in d_out per train example.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import ops
from .batching import data_order
from .capture import Capture, Layer, frozen_for_capture, iter_batches, model_device, select_layers
from .config import ProjectionConfig
from .normalizer import Normalizer
from .ops._common import masked

METHODS = ("auto", "ghost", "dense")


def per_example_gradients(
    A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, bias: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, d_out * (d_in + bias)) flattened per-example gradients [grad W | grad b] from masked factors.

    One batched product G_i^T A_i written contiguously (row-major grad W), whatever the
    strides of the incoming gradient; into ``out`` (B, d_out * (d_in + bias)) when given.
    """
    if bias:
        A = torch.cat([A, mask.unsqueeze(-1).to(A.dtype)], dim=-1)
    B, d_out, d_in = A.shape[0], G.shape[-1], A.shape[-1]
    if out is None:
        return torch.bmm(G.transpose(1, 2), A).view(B, -1)
    torch.bmm(G.transpose(1, 2), A, out=out.view(B, d_out, d_in))
    return out


class _QueryLayer:
    """What the query pass keeps for one layer: masked factors per query batch, later maybe dense gradients."""

    def __init__(self):
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.method: str | None = None
        self.dense: torch.Tensor | None = None

    def choose(self, layer: Layer, method: str, train_T: int, bias: bool) -> None:
        Q = sum(A.shape[0] for A, _, _ in self.blocks)
        if method == "auto":
            query_T = max(A.shape[1] for A, _, _ in self.blocks)
            d_in = layer.d_in + int(layer.bias)
            ghost_cost = Q * query_T * train_T * (layer.d_in + layer.d_out)
            dense_cost = (train_T + Q) * d_in * layer.d_out
            method = "ghost" if ghost_cost <= dense_cost else "dense"
        self.method = method
        if method == "dense":
            A0 = self.blocks[0][0]
            self.dense = torch.empty(Q, (layer.d_in + int(layer.bias)) * layer.d_out, dtype=A0.dtype, device=A0.device)
            start = 0
            for A, G, m in self.blocks:  # written in place: no (Q, d_out * d_in) concatenation
                per_example_gradients(A, G, m, bias, out=self.dense[start : start + A.shape[0]])
                start += A.shape[0]
            self.blocks = []


def exact_scores(
    model: nn.Module,
    query_batches: Iterable[dict],
    train_batches: Iterable[dict],
    config: ProjectionConfig | None = None,
    metric: str = "dot",
    method: str = "auto",
    normalizer: Normalizer | None = None,
) -> torch.Tensor:
    """Exact gradient inner products between query and train examples.

    Args:
        model: a causal LM (left unchanged).
        query_batches, train_batches: HF-style batch dicts, as for ``GradientExtractor``.
        config: selects the layers (``include`` / ``exclude`` / ``include_bias``) and
            ``autocast``; the ranks are ignored. Default: ``ProjectionConfig()``. With
            ``autocast="bfloat16"`` the forward runs under autocast and, on the dense method,
            per-example gradients are formed and dotted as bfloat16 matmuls (float32
            accumulation, one rounding per layer's gradient and per layer's score; the ghost
            method's torch reference works in float32), summed over layers in float32: no
            projection error, the low precision's instead (bench/peers). ``float16``: the
            forward only; products in float32 (a per-layer score can exceed float16's range).
        metric: ``dot`` (<grad_q, grad_i>) or ``cosine`` (divided by both norms).
        method: ``auto`` (cheaper of the two per layer), ``ghost`` or ``dense``.
        normalizer: a ``Normalizer``: inner products of the normalised gradients g / sqrt(V).

    Returns:
        (Q, N) scores, float64 for a float64 model, float32 otherwise, summed over layers; rows and
        columns in data order (length-bucketed batches with ``positions`` are put back in order).
    """
    if metric not in ("dot", "cosine"):
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = config or ProjectionConfig()
    layers = select_layers(model, config.include, config.exclude, config.include_bias)
    if normalizer is not None:
        normalizer.check(layers)
    device = model_device(model)
    dtype = torch.float64 if layers[0].weight.dtype == torch.float64 else torch.float32
    if config.autocast is not None and layers[0].weight.dtype != torch.float32:
        raise ValueError(
            f"ProjectionConfig(autocast={config.autocast!r}) needs a float32 model (autocast lowers float32 "
            f"matmuls), got {layers[0].weight.dtype}; leave autocast=None"
        )
    if config.autocast == "float16" and device.type == "cpu":
        warnings.warn(
            "ProjectionConfig(autocast='float16') on a CPU: float16 matmuls are emulated there (about 10x slower "
            "than float32); use autocast='bfloat16' on a CPU",
            stacklevel=2,
        )
    # The dtype per-example gradients are formed and dotted in (scores stay in ``dtype``): bfloat16
    # under a bfloat16 autocast; float32 under float16, whose range a per-layer score can exceed.
    compute = torch.bfloat16 if config.autocast == "bfloat16" else dtype
    queries = {l.name: _QueryLayer() for l in layers}

    # Squared gradient norms are needed for the cosine only; the dot product skips them.
    cosine = metric == "cosine"

    def factors(layer: Layer, A, G, mask):
        """Masked (A, G) in the compute dtype and the bias flag for the ops (normalised: A~ holds the bias)."""
        A, G = masked(A.to(compute), mask), masked(G.to(compute), mask)
        if normalizer is None:
            return A, G, layer.bias
        A, G = normalizer.scaled(layer, A, G, mask)
        return A.to(compute), G.to(compute), False

    with frozen_for_capture(model, layers):
        capture = Capture(model, layers, config.autocast_dtype)
        query_sq, n_queries, query_pos = [], 0, []
        for batch in iter_batches(query_batches, device, model):
            query_pos.append((batch.input_ids.shape[0], batch.positions))
            sq = torch.zeros(batch.input_ids.shape[0], dtype=dtype, device=device)
            n_queries += batch.input_ids.shape[0]

            def keep(layer: Layer, A, G, mask, sq=sq):
                A, G, bias = factors(layer, A, G, mask)
                queries[layer.name].blocks.append((A, G, mask))
                if cosine:
                    sq += ops.ghost_norm(A, G, mask, bias)

            capture.run(batch, keep)
            query_sq.append(sq)
        query_sq = torch.cat(query_sq)

        columns, train_sq, train_pos = [], [], []
        for batch in iter_batches(train_batches, device, model):
            train_pos.append((batch.input_ids.shape[0], batch.positions))
            B, T = batch.input_ids.shape
            S = torch.zeros(n_queries, B, dtype=dtype, device=device)
            sq = torch.zeros(B, dtype=dtype, device=device)

            def score(layer: Layer, A, G, mask, S=S, sq=sq, T=T):
                A, G, bias = factors(layer, A, G, mask)
                q = queries[layer.name]
                if q.method is None:
                    q.choose(layer, method, T, bias)
                if q.method == "ghost":
                    S.add_(torch.cat([ops.ghost_dot(qA, qG, A, G, qm, mask, bias) for qA, qG, qm in q.blocks]))
                    if cosine:
                        sq.add_(ops.ghost_norm(A, G, mask, bias))
                else:
                    W = per_example_gradients(A, G, mask, bias)
                    if W.dtype == dtype:
                        S.addmm_(q.dense, W.T)
                    else:  # autocast: a low-precision product, summed over layers in ``dtype``
                        S.add_(q.dense @ W.T)
                    if cosine:
                        sq.add_(torch.linalg.vector_norm(W, dim=1, dtype=dtype).square())

            capture.run(batch, score)
            columns.append(S)
            train_sq.append(sq)
    scores = torch.cat(columns, dim=1)
    if cosine:
        scores = scores / query_sq.sqrt()[:, None] / torch.cat(train_sq).sqrt()[None, :]
    return scores[data_order(query_pos)][:, data_order(train_pos)]
