"""What a batch dict means to every stage: example ids, data positions, length buckets.

A batch may carry ``positions``: each example's index in data order (0-based over the
batches given). Batches built by length (``length_batches``, ``data.batches(bucket=True)``)
do, so that whatever they feed comes back in data order: the batches are cut into
*windows*, consecutive batches whose positions are exactly the next run of data positions
(``windows``), and features are handed on window by window, rows sorted by position.
A batch without ``positions`` is its own window, in stream order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence


def batch_ids(batch: dict, n: int, start: int) -> list:
    """One id per example: the batch's ``ids`` / ``id`` as Python str/int, else its ``positions``,
    else ``start .. start + n``."""
    ids = batch.get("ids", batch.get("id"))
    if ids is None:
        positions = batch_positions(batch, n)
        return positions if positions is not None else list(range(start, start + n))
    if hasattr(ids, "tolist"):  # torch tensor or numpy array
        ids = ids.tolist()
    elif isinstance(ids, (str, int)):
        ids = [ids]
    ids = [i.item() if hasattr(i, "item") else i for i in ids]  # numpy / torch scalars
    if len(ids) != n:
        raise ValueError(f"batch 'ids' has {len(ids)} entries for {n} examples; give one id per example")
    bad = [i for i in ids if not isinstance(i, (str, int))]
    if bad:
        raise ValueError(
            f"example ids must be str or int (they are stored as JSON), got {type(bad[0]).__name__}: {bad[0]!r}"
        )
    return ids


def batch_positions(batch: Mapping, n: int) -> list[int] | None:
    """The batch's ``positions`` (each example's 0-based index in data order) as ints, or None."""
    positions = batch.get("positions")
    if positions is None:
        return None
    if hasattr(positions, "tolist"):
        positions = positions.tolist()
    positions = [p.item() if hasattr(p, "item") else p for p in positions]  # numpy / torch scalars
    if len(positions) != n:
        raise ValueError(f"batch 'positions' has {len(positions)} entries for {n} examples; give one per example")
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions):
        raise ValueError(f"batch 'positions' must be non-negative ints (indices in data order), got {positions[:5]}")
    return positions


class WindowTracker:
    """Cuts a stream of batches into windows (see the module docstring).

    ``add(n, positions)`` takes the next batch (its size and ``batch_positions``, None for
    stream order) and returns True when it closes a window; ``start`` is the data position
    where the open window begins. ``finish()`` raises when the stream ended inside a window.
    """

    def __init__(self) -> None:
        self.start, self.count, self.top = 0, 0, -1
        self.seen: set[int] = set()

    def following(self, n: int) -> list[int]:
        """Positions of a next batch of ``n`` examples given in stream order."""
        return list(range(self.start + self.count, self.start + self.count + n))

    def add(self, n: int, positions: list[int] | None) -> bool:
        if positions is None:
            positions = self.following(n)
        for p in positions:
            if p < self.start or p in self.seen:
                raise ValueError(
                    f"batch 'positions' {p} occurs twice or lies before data position {self.start}: positions must "
                    "number the examples 0..N-1 in data order, each once, every window of batches covering the next "
                    "run of positions (build the batches with fastinfluence.batching.length_batches)"
                )
            self.seen.add(p)
        self.count += n
        self.top = max([self.top, *positions])
        if self.top != self.start + self.count - 1:
            return False
        self.start, self.count, self.seen = self.start + self.count, 0, set()
        return True

    @property
    def open(self) -> bool:
        """Whether batches were added since the last window closed."""
        return bool(self.seen)

    def finish(self) -> None:
        if self.open:
            missing = sorted(set(range(self.start, self.top + 1)) - self.seen)
            raise ValueError(
                f"the batches' 'positions' skip data positions {missing[:5]}: positions must number the examples "
                "0..N-1 in data order, each once"
            )


def data_order(batches: Sequence[tuple[int, list[int] | None]]) -> list[int]:
    """Stream row of each data position, from each batch's (size, positions or None).

    ``rows[data_order(...)]`` puts rows computed batch by batch back into data order (the
    identity for batches in stream order).
    """
    tracker, flat = WindowTracker(), []
    for n, positions in batches:
        positions = positions if positions is not None else tracker.following(n)
        tracker.add(n, positions)
        flat.extend(positions)
    tracker.finish()
    return sorted(range(len(flat)), key=flat.__getitem__)


def windows(batches: Sequence[Mapping]) -> list[list[int]]:
    """Indices of the batches of each window, in stream order (one per batch without ``positions``)."""
    tracker, out, current = WindowTracker(), [], []
    for i, b in enumerate(batches):
        n = len(b["input_ids"])
        current.append(i)
        if tracker.add(n, batch_positions(b, n)):
            out.append(current)
            current = []
    tracker.finish()
    return out


def length_batches(
    lengths: Sequence[int],
    batch_size: int | None = 8,
    max_tokens: int | None = None,
    window: int | None = 1024,
    seed: int | None = None,
) -> list[list[int]]:
    """Example indices of each batch, grouped by length so that a batch is padded only to its own longest.

    The examples are taken ``window`` at a time in data order (all at once with None; with
    ``seed``, from a seeded shuffle, as a training sampler's mega-batches), each window sorted
    longest first (an out-of-memory shows on the first batch) and cut into batches of at most
    ``batch_size`` examples and at most ``max_tokens`` padded tokens (examples x longest).
    At least one of the two limits is needed; None means no limit. Extraction keeps a
    window's features until it is complete, so ``window`` bounds that memory.

    Returns:
        lists of indices into ``lengths``; every index once.
    """
    for name, v in (("batch_size", batch_size), ("max_tokens", max_tokens), ("window", window)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    if batch_size is None and max_tokens is None:
        raise ValueError("length_batches needs batch_size or max_tokens (or both) to know where a batch ends")
    lengths = [int(n) for n in lengths]
    if max_tokens is not None and lengths and max(lengths) > max_tokens:
        i = max(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(
            f"example {i} has {lengths[i]} tokens, more than max_tokens={max_tokens}: raise max_tokens to at least "
            f"the longest example ({lengths[i]}) or lower max_length"
        )
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    step = window or max(1, len(order))
    out: list[list[int]] = []
    for s in range(0, len(order), step):
        batch: list[int] = []
        for i in sorted(order[s : s + step], key=lambda i: (-lengths[i], i)):
            full = batch_size is not None and len(batch) >= batch_size
            # Longest first: the batch's first example sets its padded length.
            over = max_tokens is not None and batch and (len(batch) + 1) * lengths[batch[0]] > max_tokens
            if full or over:
                out.append(batch)
                batch = []
            batch.append(i)
        if batch:
            out.append(batch)
    return out
