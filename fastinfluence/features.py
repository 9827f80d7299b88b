"""In-memory per-example features and the chunk interface that scoring streams over."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from . import errors
from .config import ProjectionConfig


class LayerSlice(NamedTuple):
    """Where one layer's features sit in a feature row: columns [start, stop), phi shape (k_out, k_in)."""

    start: int
    stop: int
    shape: tuple[int, int]


@dataclass
class TokenFactors:
    """Per-token projected factors for per-token scores.

    Token rows of example i are ``offsets[i]:offsets[i+1]`` (valid tokens only, in order).
    a[layer]: (total_tokens, k_in) = A~, g[layer]: (total_tokens, k_out) = G~, so that
    phi_i[layer] = g[layer][rows].T @ a[layer][rows].
    """

    offsets: torch.Tensor
    a: dict[str, torch.Tensor]
    g: dict[str, torch.Tensor]


class Chunk(NamedTuple):
    """A block of consecutive feature rows: rows ``offset .. offset + len(data)``."""

    offset: int
    data: torch.Tensor
    norms: torch.Tensor


@dataclass
class Features:
    """Per-example gradient features held in memory.

    Attributes:
        data: (N, D) features in the storage dtype; row i is example ``ids[i]``.
        norms: (N,) float32 L2 norms of the rows, computed before the cast to storage dtype.
        ids: N example ids (from the batches' ``id`` / ``ids`` key, else running indices).
        layout: layer name -> LayerSlice (factorized mode); flat mode has one entry ``"flat"``.
        config: the ProjectionConfig that made them.
        fingerprint: identity of the model and captured layers (checked before scoring).
        tokens: per-token factors when extracted with ``tokens=True``.
        stats: per layer, (sum a~ a~^T (k_in, k_in), sum g~ g~^T (k_out, k_out), tokens)
            in float64 when extracted with ``covariances=True`` (for K-FAC preconditioning).
    """

    data: torch.Tensor
    norms: torch.Tensor
    ids: list
    layout: dict[str, LayerSlice]
    config: ProjectionConfig | None = None
    fingerprint: dict | None = None
    tokens: TokenFactors | None = None
    stats: dict[str, tuple[torch.Tensor, torch.Tensor, int]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def num_rows(self) -> int:
        return self.data.shape[0]

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the rows."""
        return self.data.dtype

    def iter_chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        """Consecutive blocks of at most ``rows`` rows of [start, stop) (global row offsets)."""
        if rows < 1:
            raise ValueError(f"iter_chunks: rows must be >= 1, got {rows}")
        stop = self.num_rows if stop is None else stop
        for s in range(start, stop, rows):
            e = min(s + rows, stop)
            yield Chunk(s, self.data[s:e], self.norms[s:e])

    def metadata(self) -> dict:
        """config / fingerprint / layout / dtype, compared before scoring two sources together."""
        return {
            "config": self.config,
            "fingerprint": self.fingerprint or {},
            "layout": self.layout,
            "dtype": self.dtype,
        }

    def row_bounds(self) -> list[int]:
        """Rows at which the rows may be split between processes: any row."""
        return list(range(self.num_rows + 1))

    def rows(self, indices: Iterable[int]) -> torch.Tensor:
        """(len(indices), D) feature rows in the storage dtype."""
        return self.data[list(indices)]

    def token_factors(self, row: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-token factors of one example: ({layer: A~ (T, k_in)}, {layer: G~ (T, k_out)})."""
        if self.tokens is None:
            raise errors.FastInfluenceError(
                f"these train Features have no per-token factors: extract them with {errors.name('tokens', True)}",
                "tokens",
            )
        o = self.tokens.offsets
        span = slice(int(o[row]), int(o[row + 1]))
        return {n: t[span] for n, t in self.tokens.a.items()}, {n: t[span] for n, t in self.tokens.g.items()}

    def to_features(self) -> Features:
        """These features (a source loaded whole)."""
        return self


def cat_features(parts: list[Features]) -> Features:
    """Concatenate per-batch Features (same layout) into one; token offsets and stats are merged."""
    if not parts:
        raise ValueError("cat_features needs at least one Features")
    first = parts[0]
    tokens = None
    if first.tokens is not None:
        offsets, total = [torch.zeros(1, dtype=torch.long)], 0
        for p in parts:
            offsets.append(p.tokens.offsets[1:] + total)
            total += int(p.tokens.offsets[-1])
        tokens = TokenFactors(
            torch.cat(offsets),
            {n: torch.cat([p.tokens.a[n] for p in parts]) for n in first.tokens.a},
            {n: torch.cat([p.tokens.g[n] for p in parts]) for n in first.tokens.g},
        )
    stats = None
    if first.stats is not None:
        stats = {
            n: (sum(p.stats[n][0] for p in parts), sum(p.stats[n][1] for p in parts), sum(p.stats[n][2] for p in parts))
            for n in first.stats
        }
    return Features(
        data=torch.cat([p.data for p in parts]),
        norms=torch.cat([p.norms for p in parts]),
        ids=[i for p in parts for i in p.ids],
        layout=first.layout,
        config=first.config,
        fingerprint=first.fingerprint,
        tokens=tokens,
        stats=stats,
    )


def slice_rows(f: Features, a: int, b: int) -> Features:
    """Rows ``a:b`` of ``f`` with their token factors. Stats are per-batch sums: kept only for all rows."""
    if (a, b) == (0, len(f)):
        return f
    if f.stats is not None:
        raise ValueError(
            "covariance sums cover a whole batch and cannot be split by rows: resume or split at a batch boundary"
        )
    tokens = None
    if f.tokens is not None:
        o = f.tokens.offsets
        lo, hi = int(o[a]), int(o[b])
        tokens = TokenFactors(
            o[a : b + 1] - lo,
            {n: t[lo:hi] for n, t in f.tokens.a.items()},
            {n: t[lo:hi] for n, t in f.tokens.g.items()},
        )
    return Features(f.data[a:b], f.norms[a:b], f.ids[a:b], f.layout, f.config, f.fingerprint, tokens, None)


def reorder_rows(f: Features, order: list[int]) -> Features:
    """Rows of ``f`` in the order ``order`` (a permutation of its row indices), with their token
    factors; stats (sums over all rows) are kept."""
    if order == list(range(len(f))):
        return f
    index = torch.as_tensor(order, dtype=torch.long)
    tokens = None
    if f.tokens is not None:
        o = f.tokens.offsets
        counts = (o[1:] - o[:-1])[index]
        token_index = torch.cat([torch.arange(int(o[i]), int(o[i + 1])) for i in order])
        tokens = TokenFactors(
            torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
            {n: t[token_index] for n, t in f.tokens.a.items()},
            {n: t[token_index] for n, t in f.tokens.g.items()},
        )
    return Features(
        f.data[index], f.norms[index], [f.ids[i] for i in order], f.layout, f.config, f.fingerprint, tokens, f.stats
    )


@runtime_checkable
class FeatureSource(Protocol):
    """What scoring, preconditioning and weights read: ``Features`` in memory and ``FeatureStore`` on disk.

    Members: ``layout`` (layer -> LayerSlice), ``ids`` (N example ids), ``config``,
    ``fingerprint``, ``num_rows`` / ``len()`` (N), ``dim`` (D), ``dtype`` (storage dtype),
    ``norms`` ((N,) float32), ``stats`` (per layer (sum a~a~^T, sum g~g~^T, tokens) float64,
    or None without covariances), ``metadata()``, ``iter_chunks(rows, start, stop)``,
    ``rows(indices)`` ((n, D) at random), ``row_bounds()`` (where a split between processes
    may fall), ``token_factors(row)`` and ``to_features()`` (the whole source in memory).
    """

    layout: dict[str, LayerSlice]
    ids: list
    config: ProjectionConfig | None
    fingerprint: dict | None

    @property
    def num_rows(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def norms(self) -> torch.Tensor: ...

    @property
    def stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]] | None: ...

    def __len__(self) -> int: ...

    def metadata(self) -> dict: ...

    def iter_chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]: ...

    def rows(self, indices: Iterable[int]) -> torch.Tensor: ...

    def row_bounds(self) -> list[int]: ...

    def token_factors(self, row: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...

    def to_features(self) -> Features: ...


@runtime_checkable
class FeatureProducer(Protocol):
    """What makes features from batches (``GradientExtractor``); a store writer consumes its output.

    ``metadata()``: config / fingerprint / layout / dtype of the features it makes.
    ``iter_features``: the features of the examples after the first ``skip_examples``, in
    data order, one ``Features`` per batch (per window of length-bucketed batches, see
    ``fastinfluence.batching``; token offsets of each start at 0; ``stats`` are its sums);
    ``progress``, when given, is called with the number of examples of each batch it computes.
    """

    def metadata(self) -> dict: ...

    def iter_features(
        self,
        batches: Iterable[Mapping],
        skip_examples: int = 0,
        tokens: bool = False,
        covariances: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Features]: ...
