"""GradientExtractor: per-example gradient features from one batched backward per batch."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import ops, sharding
from .batching import Batch
from .capture import CapturePass, Layer, progress_bar
from .config import ProjectionConfig
from .exact import per_example_gradients
from .features import Features, LayerSlice, TokenFactors, cat_features, in_data_order
from .moe import routed_tokens
from .normalizer import Normalizer
from .ops._common import masked
from .ops.project import project_side
from .ops.routed import project_routed, token_grid
from .projection import layer_projections

_FINGERPRINT_SAMPLES = 64


def fingerprint(model: nn.Module, layers: list[Layer]) -> dict:
    """Identity of the captured layers: names, shapes, dtypes and a hash of sampled weights.

    The same for a model sharded by FSDP2 as for the whole model: a sharded weight is gathered,
    one layer at a time (every rank calls this then)."""
    h = hashlib.sha256()
    for layer in layers:
        w = sharding.whole(layer.weight.detach()).flatten()
        step = max(1, w.numel() // _FINGERPRINT_SAMPLES)
        h.update(w[::step][:_FINGERPRINT_SAMPLES].to("cpu", torch.float64).numpy().tobytes())
    return {
        "model": sharding.model_class(model).__name__,
        "layers": [
            [l.name, l.d_in, l.d_out, l.bias, str(l.weight.dtype).replace("torch.", "")] + (["tied share"] * l.tied)
            for l in layers
        ],
        "weights_sha256": h.hexdigest(),
    }


class _Projected:
    """A layer's input already projected in the forward (``_batch_features``): At = A P_in (B, T, k_in)."""

    def __init__(self, t: torch.Tensor):
        self.t = t


class GradientExtractor:
    """Projected per-example gradient features of a causal LM.

    Example::

        extractor = GradientExtractor(model, ProjectionConfig(rank_in=64, rank_out=64))
        train = extractor.extract(train_loader)            # Features, data (N, D)
        result = fastinfluence.score(extractor.extract(query_loader), train, topk=10)

    Each batch costs one forward and one backward with parameter gradients switched off;
    per-example gradients are never formed: each layer's (A, G) is projected as soon as
    its output gradient arrives (``ops.project``).

    ``normalizer``: a ``Normalizer`` (or the path of a saved one) whose second-moment scales
    are folded into the projections, so the features are those of g / sqrt(V) (TrackStar;
    see ``normalizer.py``); its identity joins the fingerprint.
    """

    def __init__(
        self, model: nn.Module, config: ProjectionConfig | None = None, normalizer: Normalizer | str | None = None
    ):
        self.model = model
        self.config = config or ProjectionConfig()
        self.capture = CapturePass(model, self.config)
        self.layers = self.capture.layers
        if isinstance(normalizer, (str, Path)):
            normalizer = Normalizer.load(normalizer)
        if normalizer is not None and not isinstance(normalizer, Normalizer):
            raise ValueError(f"normalizer must be a Normalizer or the path of a saved one, got {type(normalizer)}")
        if normalizer is not None:
            normalizer.check(self.layers)
        self.normalizer = normalizer
        self._proj = {l.name: layer_projections(l, self.config) for l in self.layers}
        if normalizer is not None:
            self._proj = {n: normalizer.fold(n, *P) for n, P in self._proj.items()}
        self._proj_dev: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layout = self._layout()
        self._sharded_fp: tuple[list[int], dict] | None = None
        self._flat_offsets, offset = {}, 0
        for l in self.layers:
            self._flat_offsets[l.name] = offset
            offset += l.d_out * (l.d_in + int(l.bias))

    @property
    def fingerprint(self) -> dict:
        """Identity of the model's captured layers now (weights may change between extractions).

        On a sharded model every rank reads it at the same point (it gathers the weights), and
        it is kept while the weights are unchanged (their version counters), so that ranks
        extracting different numbers of runs of a store need not gather again."""
        if not sharding.is_sharded(self.model):
            fp = fingerprint(self.model, self.layers)
        else:
            key = [(id(l.weight), l.weight._version) for l in self.layers]
            if self._sharded_fp is None or self._sharded_fp[0] != key:
                self._sharded_fp = (key, fingerprint(self.model, self.layers))
            fp = dict(self._sharded_fp[1])
        if self.normalizer is not None:
            fp["normalizer"] = self.normalizer.identity(l.name for l in self.layers)
        return fp

    @property
    def device(self) -> torch.device:
        return self.capture.device

    @property
    def dtype(self) -> torch.dtype:
        """Accumulation dtype: float64 for a float64 model, float32 otherwise."""
        return self.capture.dtype

    def _layout(self) -> dict[str, LayerSlice]:
        if self.config.mode == "flat":
            return {"flat": LayerSlice(0, self.config.dim, (1, self.config.dim))}
        layout, start = {}, 0
        for l in self.layers:
            P_in, P_out = self._proj[l.name]
            shape = (P_out.shape[1], P_in.shape[1])
            layout[l.name] = LayerSlice(start, start + shape[0] * shape[1], shape)
            start += shape[0] * shape[1]
        return layout

    @property
    def dim(self) -> int:
        """Feature width D."""
        return max(s.stop for s in self.layout.values())

    def metadata(self) -> dict:
        """What a store records to refuse mismatched features: config, fingerprint, layout, dtype."""
        return {
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "dtype": self.config.dtype,
        }

    def projections(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in, P_out) of a layer on ``device`` in ``dtype`` (cached)."""
        key = (name, device, dtype)
        if key not in self._proj_dev:
            self._proj_dev[key] = tuple(P.to(device, dtype) for P in self._proj[name])
        return self._proj_dev[key]

    # -----------------------------------------------------------------------------------

    def extract(
        self,
        batches: Iterable[dict],
        tokens: bool = False,
        covariances: bool = False,
        store: str | None = None,
        shard_rows: int = 4096,
        progress: bool = False,
    ):
        """Features of every example in ``batches``.

        Args:
            batches: HF-style dicts (``input_ids`` (B, T), ``attention_mask``, ``labels``
                with -100 on non-answer tokens, optional ``ids``), e.g. a DataLoader.
            tokens: also keep per-token factors (``Features.tokens``) for per-token scores.
            covariances: also sum a~a~^T and g~g~^T per layer (``Features.stats``, K-FAC).
            store: a directory: write a resumable on-disk FeatureStore there and return it.
            shard_rows: rows per shard of the store.
            progress: show a progress bar.

        Returns:
            ``Features`` in memory, or the ``FeatureStore`` when ``store`` is given.
        """
        if store is not None:
            from .store import write_store

            return write_store(
                store, self, batches, tokens=tokens, covariances=covariances, shard_rows=shard_rows, progress=progress
            )
        with progress_bar("extract" if progress else None) as bar:
            parts = list(self.iter_features(batches, tokens=tokens, covariances=covariances, progress=bar))
        features = cat_features(parts)
        self.capture.finish()  # a sharded model's ranks may hold different numbers of batches
        return features

    def iter_features(
        self,
        batches: Iterable[dict],
        skip_examples: int = 0,
        tokens: bool = False,
        covariances: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Features]:
        """``Features`` of the examples after the first ``skip_examples``, in data order.

        One ``Features`` per window of batches (``fastinfluence.batching``): per batch for
        batches in stream order, per run of length-bucketed batches (with ``positions``)
        covering the next data positions, rows sorted back into data order. Batches that lie
        wholly within the skipped examples are not computed. Token offsets of each yielded
        Features start at 0; ``stats`` hold per-window sums. ``progress``: called with the number
        of wanted examples of each batch once computed (a bar moves per batch, not per window).
        """
        window = []
        for positions, features, closes in self.iter_batch_features(
            batches, skip_examples, tokens=tokens, covariances=covariances, progress=progress
        ):
            if features is not None:
                window.append((positions, features))
            if closes and window:
                yield in_data_order(window, skip_examples)
                window = []

    def iter_batch_features(
        self,
        batches: Iterable[dict],
        skip_examples: int = 0,
        done: Container[int] = (),
        tokens: bool = False,
        covariances: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[list[int], Features | None, bool]]:
        """Per batch of ``batches``, in stream order: (its data positions, its ``Features`` with the
        rows in batch order, whether it closes a window). The Features are None for a batch not
        computed: every example of it lies within the first ``skip_examples`` or in ``done`` (data
        positions another run already committed, see ``store.StoreWriter``). ``progress``: called
        with the number of examples of each computed batch that are neither skipped nor done."""
        if self.config.mode == "flat" and (tokens or covariances):
            raise ValueError("tokens=True and covariances=True need mode='factorized' (flat features have no layers)")
        fp = self.fingerprint
        for step in self.capture.batches(batches, skip_examples):
            wanted = sum(p >= skip_examples and p not in done for p in step.positions) if step.wanted else 0
            features = self._batch_features(step.batch, tokens, covariances, fp) if wanted else None
            if wanted and progress is not None:
                progress(wanted)
            yield step.positions, features, step.closes

    def _batch_features(self, batch: Batch, tokens: bool, covariances: bool, fp: dict) -> Features:
        if self.config.mode == "flat":
            return self._flat_features(batch, fp)
        B = batch.input_ids.shape[0]
        device, dtype = batch.input_ids.device, self.dtype
        rows = torch.empty(B, self.dim, dtype=dtype, device=device)
        store_dtype = self.config.torch_dtype
        a_tok, g_tok, stats, routed_counts = {}, {}, {}, {}
        entries, positions = {}, {}  # routed layers' own token rows (``TokenFactors``)

        attended = batch.attention_mask.bool()
        valid = attended.flatten().nonzero().squeeze(1) if tokens else None
        if tokens:  # a token's row among the batch's valid tokens, and each example's first row
            token_row = attended.flatten().long().cumsum(0) - 1
            first_row = attended.sum(1).cumsum(0) - attended.sum(1)

        head = self.capture.head_layer
        head_P_out = self.projections(head.name, device, dtype)[1] if head is not None else None

        def keep_input(layer: Layer, A, mask):
            """A P_in (B, T, k_in) in place of A from the forward on (the full input is freed as the forward
            goes), when k_in is below d_in; the product ``ops.project`` would form in the backward."""
            P_in = self.projections(layer.name, device, dtype)[0]
            if P_in is None or P_in.shape[1] >= A.shape[-1]:
                return A
            with torch.autocast(device.type, enabled=False):
                return _Projected(project_side(A, P_in, dtype))

        def on_layer(layer: Layer, A, G, mask):
            P_in, P_out = self.projections(layer.name, device, dtype)
            if isinstance(A, _Projected):
                A, P_in = A.t, None
            if layer is head and self.capture.fused is not None:  # the capture projected the head's G
                P_out = None
            sl = self.layout[layer.name]
            if layer.routed:  # mask: the (n,) examples of the tokens routed to this expert
                phi = project_routed(A, G, mask, B, P_in, P_out)
                if covariances or tokens:
                    At, Gt = (project_side(X, P, dtype) for X, P in ((A, P_in), (G, P_out)))
                if covariances:
                    a2, g2 = At.double(), Gt.double()
                    stats[layer.name], routed_counts[layer.name] = (a2.T @ a2, g2.T @ g2), len(mask)
                if tokens:  # its rows in token order, each with its token's position in its example
                    row = token_row[routed[layer.name].to(device)]
                    order = torch.argsort(row, stable=True)
                    a_tok[layer.name], g_tok[layer.name] = At[order].to(store_dtype), Gt[order].to(store_dtype)
                    positions[layer.name] = row[order] - first_row[mask[order]]
                    counts = torch.bincount(mask, minlength=B)
                    entries[layer.name] = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            elif tokens or covariances:
                At, Gt = ops.project_tokens(A, G, P_in, P_out, mask)
                phi = Gt.transpose(1, 2) @ At
                At, Gt = At.flatten(0, 1), Gt.flatten(0, 1)
                if covariances:  # masked rows are zero, so they add nothing
                    a2, g2 = At.double(), Gt.double()
                    stats[layer.name] = (a2.T @ a2, g2.T @ g2)
                if tokens:
                    a_tok[layer.name] = At.index_select(0, valid).to(store_dtype)
                    g_tok[layer.name] = Gt.index_select(0, valid).to(store_dtype)
            else:
                phi = ops.project(A, G, P_in, P_out, mask)
            rows[:, sl.start : sl.stop] = phi.reshape(B, -1)

        with routed_tokens() if tokens else contextlib.nullcontext({}) as routed:
            self.capture.backward(batch, on_layer, head_projection=head_P_out, keep_input=keep_input)
        token_factors = None
        if tokens:
            counts = attended.sum(1).cpu()
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            cpu = lambda d: {n: t.cpu() for n, t in d.items()}  # noqa: E731
            token_factors = TokenFactors(offsets, cpu(a_tok), cpu(g_tok), cpu(entries), cpu(positions))
        if covariances:
            n_tokens = int(attended.sum())
            stats = {n: (CA.cpu(), CG.cpu(), routed_counts.get(n, n_tokens)) for n, (CA, CG) in stats.items()}
        return self._features(rows, batch.ids, token_factors, stats if covariances else None, fp)

    def _flat_features(self, batch: Batch, fp: dict) -> Features:
        """Flat mode: each layer's per-example gradients, JL-projected into one sketch.

        The implicit JL matrix is indexed by the position in the concatenated gradient
        vector (``offset``), so summing per-layer sketches equals sketching the whole
        vector, and only one layer's (B, d_out * d_in) gradients exist at a time.
        """
        B = batch.input_ids.shape[0]
        rows = torch.zeros(B, self.config.dim, dtype=self.dtype, device=batch.input_ids.device)
        cfg = self.config

        def on_layer(layer: Layer, A, G, mask):
            if layer.routed:  # an expert's routed tokens, laid out per example
                A, G, mask = token_grid(A, G, mask, B)
            A, G, bias = masked(A.to(self.dtype), mask), masked(G.to(self.dtype), mask), layer.bias
            if self.normalizer is not None:  # A gains the bias column
                (A, G), bias = self.normalizer.scaled(layer, A, G, mask), False
            grads = per_example_gradients(A, G, mask, bias)
            rows.add_(
                ops.jl_project(grads, cfg.dim, seed=cfg.seed, kind=cfg.kind, offset=self._flat_offsets[layer.name])
            )

        self.capture.backward(batch, on_layer)
        return self._features(rows, batch.ids, None, None, fp)

    def _features(self, rows, ids, tokens, stats, fp) -> Features:
        return Features(
            data=rows.to("cpu", self.config.torch_dtype),
            norms=rows.norm(dim=1).to("cpu", torch.float32),
            ids=list(ids),
            layout=self.layout,
            config=self.config,
            fingerprint=fp,
            tokens=tokens,
            stats=stats,
        )
