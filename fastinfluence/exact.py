"""Exact per-example gradient inner products: the gold standard projections are measured against.

For each selected layer, one of two exact methods is used, whichever costs less:

- ``ghost``: sum_{t,s} (a_qt . a_is)(g_qt . g_is) from stored query factors
  (``ops.ghost_dot``), about Q T_q T_i (d_in + d_out) per train example;
- ``dense``: the query gradients grad W_q are formed once and each train example's
  gradient is formed and dotted with them, about (T_i + Q) d_in d_out per train example.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import ops
from .batching import Batch
from .capture import CapturePass, Layer, PairScorer, pairwise_scores
from .config import ProjectionConfig
from .normalizer import Normalizer
from .ops._common import masked
from .ops.lm_head_grad import HeadGrad, head_ghost_dot, head_ghost_norm
from .ops.routed import ghost_dot_routed, ghost_norm_routed, gradients_routed
from .options import EXACT_METHODS as METHODS


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


class _RoutedQuery:
    """What the query pass keeps for one routed layer (an MoE expert): its routed tokens' factors with
    their query rows, later maybe the query gradients; ghost or dense chosen on the first train batch."""

    def __init__(self):
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.method: str | None = None

    def choose(self, layer: Layer, method: str, Q: int, n_train: int, B: int, bias: bool) -> None:
        self.A, self.G, self.example = (torch.cat(parts) for parts in zip(*self.blocks))
        self.blocks, self.Q = [], Q
        if method == "auto":
            d_in = layer.d_in + int(layer.bias)
            ghost_cost = len(self.example) * n_train * (d_in + layer.d_out)
            dense_cost = (n_train + Q * B) * d_in * layer.d_out
            method = "ghost" if ghost_cost <= dense_cost else "dense"
        self.method = method
        if method == "dense":
            self.dense = gradients_routed(self.A, self.G, self.example, Q, bias)
            self.A = self.G = self.example = None

    def score(self, A, G, example, bias: bool, S: torch.Tensor, sq: torch.Tensor | None) -> None:
        B = S.shape[1]
        if self.method == "ghost":
            S.add_(ghost_dot_routed(self.A, self.G, self.example, self.Q, A, G, example, B, bias))
            if sq is not None:
                sq.add_(ghost_norm_routed(A, G, example, B, bias))
            return
        W = gradients_routed(A, G, example, B, bias)
        S.addmm_(self.dense, W.T)
        if sq is not None:
            sq.add_(W.square().sum(1))


class _ExactScorer(PairScorer):
    """Exact products layer by layer: query factors kept (ghost) or query gradients formed (dense),
    whichever costs less per layer, chosen on the first train batch."""

    def __init__(
        self, capture: CapturePass, cosine: bool, method: str, autocast: str | None, normalizer: Normalizer | None
    ):
        super().__init__(cosine)
        self.capture, self.method, self.normalizer = capture, method, normalizer
        # The dtype per-example gradients are formed and dotted in (scores stay in ``capture.dtype``):
        # bfloat16 under a bfloat16 autocast; float32 under float16, whose range a per-layer score can exceed.
        self.compute = torch.bfloat16 if autocast == "bfloat16" else capture.dtype
        self.queries = {l.name: _RoutedQuery() if l.routed else _QueryLayer() for l in capture.layers}
        self.query_sq: list[torch.Tensor] = []
        # A captured LM head's products come from its labelled tokens over vocabulary chunks
        # (ops.lm_head_grad.head_ghost_dot), never its (B, T, V) output gradient; its query
        # tokens: (HeadTokens, the head, first query row, query rows) per query batch. Not with a
        # normaliser (it scales G per vocabulary entry) or the dense method (grad W is V x H).
        self.head_grad = normalizer is None and method != "dense"
        self.head_queries: list = []

    def factors(self, layer: Layer, A, G, mask):
        """Masked (A, G) in the compute dtype and the bias flag for the ops (normalised: A~ holds the bias)."""
        A, G = masked(A.to(self.compute), mask), masked(G.to(self.compute), mask)
        if self.normalizer is None:
            return A, G, layer.bias
        A, G = self.normalizer.scaled(layer, A, G, mask)
        return A.to(self.compute), G.to(self.compute), False

    def routed_factors(self, layer: Layer, A, G, dtype: torch.dtype):
        """An expert's routed (n, d) factors in ``dtype`` and the bias flag (normalised: A~ holds the
        bias column, scaled as the normaliser scales that expert's gradient)."""
        A, G = A.to(dtype), G.to(dtype)
        if self.normalizer is None:
            return A, G, layer.bias
        s_in, s_out = self.normalizer.scales(layer.name)
        if layer.bias:
            A = torch.cat([A, A.new_ones(A.shape[0], 1)], 1)
        return A * s_in.to(A.device, dtype), G * s_out.to(G.device, dtype), False

    def query(self, batch: Batch):
        B, start = batch.input_ids.shape[0], sum(len(q) for q in self.query_sq)
        sq = torch.zeros(B, dtype=self.capture.dtype, device=self.capture.device)
        self.query_sq.append(sq)

        def keep(layer: Layer, A, G, mask):
            if isinstance(G, HeadGrad):
                tok = G.tokens(A, mask, self.capture.dtype)
                self.head_queries.append((tok, G, start, B))
                if self.cosine:
                    sq.add_(head_ghost_norm(tok, B, G, layer.bias))
                return
            if layer.routed:  # mask: the (n,) examples of the routed tokens
                A, G, bias = self.routed_factors(layer, A, G, self.capture.dtype)
                self.queries[layer.name].blocks.append((A, G, mask + start))
                if self.cosine:
                    sq.add_(ghost_norm_routed(A, G, mask, B, bias))
                return
            A, G, bias = self.factors(layer, A, G, mask)
            self.queries[layer.name].blocks.append((A, G, mask))
            if self.cosine:
                sq.add_(ops.ghost_norm(A, G, mask, bias))

        return keep

    def queries_done(self):
        return torch.cat(self.query_sq)

    def train(self, S, sq):
        def score(layer: Layer, A, G, mask):
            if isinstance(G, HeadGrad):
                tok, B = G.tokens(A, mask, S.dtype), S.shape[1]
                for q_tok, q_head, first, n in self.head_queries:
                    S[first : first + n] += head_ghost_dot(q_tok, n, tok, B, q_head, layer.bias)
                if sq is not None:
                    sq.add_(head_ghost_norm(tok, B, G, layer.bias))
                return
            q = self.queries[layer.name]
            if layer.routed:
                A, G, bias = self.routed_factors(layer, A, G, S.dtype)
                if q.method is None:
                    q.choose(layer, self.method, sum(map(len, self.query_sq)), len(mask), S.shape[1], bias)
                q.score(A, G, mask, bias, S, sq)
                return
            A, G, bias = self.factors(layer, A, G, mask)
            if q.method is None:
                q.choose(layer, self.method, A.shape[1], bias)
            if q.method == "ghost":
                S.add_(torch.cat([ops.ghost_dot(qA, qG, A, G, qm, mask, bias) for qA, qG, qm in q.blocks]))
                if sq is not None:
                    sq.add_(ops.ghost_norm(A, G, mask, bias))
                return
            W = per_example_gradients(A, G, mask, bias)
            if W.dtype == S.dtype:
                S.addmm_(q.dense, W.T)
            else:  # autocast: a low-precision product, summed over layers in the scores' dtype
                S.add_(q.dense @ W.T)
            if sq is not None:
                sq.add_(torch.linalg.vector_norm(W, dim=1, dtype=S.dtype).square())

        return score


def exact_scores(
    model: nn.Module,
    query_batches: Iterable[dict],
    train_batches: Iterable[dict],
    config: ProjectionConfig | None = None,
    metric: str = "dot",
    method: str = "auto",
    normalizer: Normalizer | None = None,
    progress: bool = False,
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
        metric: ``dot`` (<grad_q, grad_i>) or ``cosine`` (divided by both norms; an example whose
            gradient is zero scores 0).
        method: ``auto`` (cheaper of the two per layer), ``ghost`` or ``dense``.
        normalizer: a ``Normalizer``: inner products of the normalised gradients g / sqrt(V).
        progress: show a bar (in examples) for the query pass and for the train pass.

    Returns:
        (Q, N) scores, float64 for a float64 model, float32 otherwise, summed over layers; rows and
        columns in data order (length-bucketed batches with ``positions`` are put back in order).
    """
    if metric not in ("dot", "cosine"):
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = config or ProjectionConfig()
    capture = CapturePass(model, config)
    if normalizer is not None:
        normalizer.check(capture.layers)
    scorer = _ExactScorer(capture, metric == "cosine", method, config.autocast, normalizer)
    return pairwise_scores(capture, query_batches, train_batches, scorer, progress)
