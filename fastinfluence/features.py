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

    A routed layer (one MoE expert, ``layer.routed``) sees only the tokens routed to it, so its
    rows are its own: ``entries[layer]`` (N + 1,) offsets of example i's rows of a[layer] and
    g[layer], and ``positions[layer]`` each row's token (0 .. T_i - 1) among example i's valid
    tokens (a token routed to the layer several times, as through LoRA on the experts, has several
    rows). phi_i[layer] is then the same sum over example i's rows.
    """

    offsets: torch.Tensor
    a: dict[str, torch.Tensor]
    g: dict[str, torch.Tensor]
    entries: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: dict[str, torch.Tensor] = field(default_factory=dict)

    def row_offsets(self, name: str) -> torch.Tensor:
        """(N + 1,) offsets of each example's rows of layer ``name``."""
        return self.entries.get(name, self.offsets)

    def span(self, name: str, row: int) -> slice:
        o = self.row_offsets(name)
        return slice(int(o[row]), int(o[row + 1]))

    def take(self, order: list[int]) -> TokenFactors:
        """The token factors of examples ``order`` (row indices, in that order)."""

        which = torch.as_tensor(order, dtype=torch.long)

        def pick(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(new offsets, the rows to gather): example k's rows o[order[k]] .. o[order[k] + 1]."""
            starts, counts = o[:-1][which], (o[1:] - o[:-1])[which]
            new = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            return new, torch.arange(int(new[-1])) + torch.repeat_interleave(starts - new[:-1], counts)

        offsets, index = pick(self.offsets)
        picked = {n: pick(o) for n, o in self.entries.items()}
        rows = {n: picked[n][1] if n in picked else index for n in self.a}
        return TokenFactors(
            offsets,
            {n: t[rows[n]] for n, t in self.a.items()},
            {n: t[rows[n]] for n, t in self.g.items()},
            {n: o for n, (o, _) in picked.items()},
            {n: t[picked[n][1]] for n, t in self.positions.items()},
        )

    def slice(self, a: int, b: int) -> TokenFactors:
        """The token factors of examples ``a:b``."""

        def cut(name: str, t: torch.Tensor) -> torch.Tensor:
            o = self.row_offsets(name)
            return t[int(o[a]) : int(o[b])]

        return TokenFactors(
            self.offsets[a : b + 1] - self.offsets[a],
            {n: cut(n, t) for n, t in self.a.items()},
            {n: cut(n, t) for n, t in self.g.items()},
            {n: o[a : b + 1] - o[a] for n, o in self.entries.items()},
            {n: cut(n, t) for n, t in self.positions.items()},
        )

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors a store file holds: ``offsets``, ``a.<layer>``, ``g.<layer>``, and for a routed
        layer ``o.<layer>`` (its row offsets) and ``p.<layer>`` (its rows' token positions)."""
        out = {f"{prefix}offsets": self.offsets.to(torch.int64)}
        out.update({f"{prefix}a.{n}": t for n, t in self.a.items()})
        out.update({f"{prefix}g.{n}": t for n, t in self.g.items()})
        out.update({f"{prefix}o.{n}": t.to(torch.int64) for n, t in self.entries.items()})
        out.update({f"{prefix}p.{n}": t.to(torch.int64) for n, t in self.positions.items()})
        return out

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], layers: Iterable[str], prefix: str = "") -> TokenFactors:
        """What ``tensors`` wrote (a store written before routed layers had token factors has no
        ``o.`` / ``p.`` tensors: every layer shares the token rows)."""
        layers = list(layers)
        routed = [n for n in layers if f"{prefix}p.{n}" in t]
        return cls(
            t[f"{prefix}offsets"],
            {n: t[f"{prefix}a.{n}"] for n in layers},
            {n: t[f"{prefix}g.{n}"] for n in layers},
            {n: t[f"{prefix}o.{n}"] for n in routed},
            {n: t[f"{prefix}p.{n}"] for n in routed},
        )


def cat_tokens(parts: list[TokenFactors]) -> TokenFactors:
    """Token factors of consecutive groups of examples as one."""

    def offsets(os: list[torch.Tensor]) -> torch.Tensor:
        out, total = [torch.zeros(1, dtype=torch.long)], 0
        for o in os:
            out.append(o[1:] + total)
            total += int(o[-1])
        return torch.cat(out)

    first = parts[0]
    return TokenFactors(
        offsets([p.offsets for p in parts]),
        {n: torch.cat([p.a[n] for p in parts]) for n in first.a},
        {n: torch.cat([p.g[n] for p in parts]) for n in first.g},
        {n: offsets([p.entries[n] for p in parts]) for n in first.entries},
        {n: torch.cat([p.positions[n] for p in parts]) for n in first.positions},
    )


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
        """Per-token factors of one example: ({layer: A~ (T, k_in)}, {layer: G~ (T, k_out)}); a routed
        layer (an MoE expert) has its own rows (n, k_in), (n, k_out), at the tokens ``token_positions(row)`` gives."""
        tokens = self._tokens()
        return (
            {n: t[tokens.span(n, row)] for n, t in tokens.a.items()},
            {n: t[tokens.span(n, row)] for n, t in tokens.g.items()},
        )

    def token_positions(self, row: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(T, {routed layer: (n,) int64 token position in 0 .. T - 1 of each of its ``token_factors`` rows})
        of one example, T its number of tokens (no routed layer: an empty dict)."""
        tokens = self._tokens()
        o = tokens.offsets
        return int(o[row + 1] - o[row]), {n: p[tokens.span(n, row)] for n, p in tokens.positions.items()}

    def _tokens(self) -> TokenFactors:
        if self.tokens is None:
            raise errors.FastInfluenceError(
                f"these train Features have no per-token factors: extract them with {errors.name('tokens', True)}",
                "tokens",
            )
        return self.tokens

    def to_features(self) -> Features:
        """These features (a source loaded whole)."""
        return self


def cat_features(parts: list[Features]) -> Features:
    """Concatenate per-batch Features (same layout) into one; token offsets and stats are merged."""
    if not parts:
        raise ValueError("cat_features needs at least one Features")
    first = parts[0]
    tokens = cat_tokens([p.tokens for p in parts]) if first.tokens is not None else None
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
    tokens = f.tokens.slice(a, b) if f.tokens is not None else None
    return Features(f.data[a:b], f.norms[a:b], f.ids[a:b], f.layout, f.config, f.fingerprint, tokens, None)


def reorder_rows(f: Features, order: list[int]) -> Features:
    """Rows of ``f`` in the order ``order`` (a permutation of its row indices), with their token
    factors; stats (sums over all rows) are kept."""
    if order == list(range(len(f))):
        return f
    index = torch.as_tensor(order, dtype=torch.long)
    tokens = f.tokens.take(order) if f.tokens is not None else None
    return Features(
        f.data[index], f.norms[index], [f.ids[i] for i in order], f.layout, f.config, f.fingerprint, tokens, f.stats
    )


def in_data_order(pieces: list[tuple[list[int], Features]], skip_examples: int = 0) -> Features:
    """One window's per-batch (data positions, Features) as one Features, rows sorted by data
    position, those before ``skip_examples`` left out (stats: the batches' sums, in the order given)."""
    positions = [p for pos, _ in pieces for p in pos]
    feats = reorder_rows(cat_features([f for _, f in pieces]), sorted(range(len(positions)), key=positions.__getitem__))
    skipped = sum(p < skip_examples for p in positions)
    return slice_rows(feats, skipped, len(feats))


@runtime_checkable
class FeatureSource(Protocol):
    """What scoring, preconditioning and weights read: ``Features`` in memory and ``FeatureStore`` on disk.

    Members: ``layout`` (layer -> LayerSlice), ``ids`` (N example ids), ``config``,
    ``fingerprint``, ``num_rows`` / ``len()`` (N), ``dim`` (D), ``dtype`` (storage dtype),
    ``norms`` ((N,) float32), ``stats`` (per layer (sum a~a~^T, sum g~g~^T, tokens) float64,
    or None without covariances), ``metadata()``, ``iter_chunks(rows, start, stop)``,
    ``rows(indices)`` ((n, D) at random), ``row_bounds()`` (where a split between processes
    may fall), ``token_factors(row)`` and ``to_features()`` (the whole source in memory). Both
    sources also have ``token_positions(row)``, where a routed layer's token rows sit (a source
    without it has no routed layers).
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
    A producer that also has ``iter_batch_features`` (``GradientExtractor``: per batch, its data
    positions and Features, ``done`` positions not computed) has its stores committed batch by
    batch (``store.StoreWriter.write_batches``).
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
