"""What a batch dict means to every stage: validation, example ids, data positions, length buckets.

``prepare_batch`` / ``iter_batches`` turn an HF-style batch dict (``input_ids``, optional
``attention_mask``, ``labels``, ``ids``, ``positions``) into a checked :class:`Batch`: integer
tensors of one shape, labels only where a loss may be taken, token ids and lengths within what
the model accepts (``BatchLimits``), a mask inferred from the pad token when none is given.

A batch may carry ``positions``: each example's index in data order (0-based over the
batches given). Batches built by length (``length_batches``, ``data.batches(bucket=True)``)
do, so that whatever they feed comes back in data order: the batches are cut into
*windows*, consecutive batches whose positions are exactly the next run of data positions
(``windows``), and features are handed on window by window, rows sorted by position.
A batch without ``positions`` is its own window, in stream order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import errors

if TYPE_CHECKING:  # torch is imported where tensors are made: the command line's --help stays torch-free
    import torch
    from torch import nn

IGNORE_INDEX = -100  # labels that carry no loss (the transformers convention)

log = logging.getLogger("fastinfluence.batching")


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
        raise errors.FastInfluenceError(
            f"example {i} has {lengths[i]} tokens, more than {errors.name('max_tokens', max_tokens)}: raise "
            f"{errors.name('max_tokens')} to at least the longest example ({lengths[i]}) or lower "
            f"{errors.name('max_length')}",
            "max_tokens",
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


# ---------------------------------------------------------------------------------------
# Validated batches
# ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A validated batch on the model's device. ``ids``: one id per example; ``positions``: their
    indices in data order when the batch says (``fastinfluence.batching``), else None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    ids: list
    positions: list[int] | None = None


@dataclass(frozen=True)
class BatchLimits:
    """What a model accepts: token ids < vocab_size, at most max_positions tokens; pad/eos ids (or None)."""

    vocab_size: int | None = None
    max_positions: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> BatchLimits:
        cfg = getattr(model, "config", None)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None) or getattr(cfg, "vocab_size", None)
        # Only absolute position embeddings have a hard limit (rotary ones extrapolate).
        positions = getattr(cfg, "n_positions", None) if hasattr(cfg, "n_positions") else None
        if positions is None and getattr(cfg, "model_type", None) in ("opt", "gpt_bigcode", "bloom", "bert"):
            positions = getattr(cfg, "max_position_embeddings", None)
        eos = getattr(cfg, "eos_token_id", None)
        return cls(vocab, positions, getattr(cfg, "pad_token_id", None), eos if isinstance(eos, int) else None)


def _warn(warned: set[str] | None, key: str, message: str, *args) -> None:
    """Log ``message`` once per pass: not again once ``key`` is in ``warned`` (every time when None)."""
    if warned is not None and key in warned:
        return
    log.warning(message, *args)
    if warned is not None:
        warned.add(key)


def _infer_mask(input_ids: torch.Tensor, limits: BatchLimits, ids: list, warned: set[str] | None) -> torch.Tensor:
    """Attention mask of a batch given without one: padding is the leading or trailing run of
    ``pad_token_id``. Refused where padding cannot be told from content."""
    import torch

    pad = limits.pad_token_id
    ones = torch.ones_like(input_ids, dtype=torch.long)
    if pad is None or not bool((input_ids == pad).any()):
        return ones
    is_pad = input_ids == pad
    lead = is_pad.long().cumprod(1).bool()
    trail = is_pad.flip(1).long().cumprod(1).flip(1).bool()
    if limits.eos_token_id == pad or bool((is_pad & ~lead & ~trail).any()):
        rows = torch.nonzero((is_pad & ~lead & ~trail).any(1)).flatten().tolist() or [0]
        raise ValueError(
            f"the batch has no attention_mask and examples {[ids[i] for i in rows[:5]]} hold the pad token "
            f"{pad} where it cannot be told from text (inside the sequence, or pad = eos): pass attention_mask"
        )
    _warn(
        warned,
        "mask",
        "the batch has no attention_mask: taking the leading/trailing pad tokens (id %d) as padding; "
        "pass attention_mask to say so explicitly",
        pad,
    )
    return (~(lead | trail)).long()


def prepare_batch(
    batch: dict,
    device: torch.device,
    start: int,
    limits: BatchLimits | None = None,
    warned: set[str] | None = None,
) -> Batch:
    """Validate an HF-style batch (``input_ids``, optional ``attention_mask`` / ``labels`` / ``ids``).

    Missing labels mean every attended token is a target, the prompt's included (logged as a
    warning); labels at padding are ignored (see ``_label_positions`` for the labelled final eos
    of eos-padded batches).
    ``start`` is the running index of the batch's first example (default ids). A missing
    attention mask is inferred from the model's ``pad_token_id`` (see ``_infer_mask``);
    ``limits`` (``BatchLimits.of(model)``) also checks token ids and lengths, naming the example.
    ``warned``: the warnings already logged in this pass over the data, updated here, so that a
    pass logs each once (None: every call logs its own).
    """
    import torch

    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError(
            f"a batch must be a dict with 'input_ids' (and 'attention_mask', 'labels'), got {type(batch).__name__}"
        )
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)
    limits = limits or BatchLimits()
    ids = batch_ids(batch, shape[0], start)
    mask = batch.get("attention_mask")
    mask = _infer_mask(input_ids, limits, ids, warned) if mask is None else torch.as_tensor(mask)
    given = batch.get("labels")
    if given is None:
        _warn(
            warned,
            "labels",
            "the batch has no 'labels': every attended token is a target, the prompt's too; to take the loss on "
            "the answer only, pass labels with -100 on the prompt tokens (fastinfluence.data.batches does)",
        )
    labels = input_ids.clone() if given is None else torch.as_tensor(given)
    for key, t in (("input_ids", input_ids), ("attention_mask", mask), ("labels", labels)):
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(
                f"batch {key} has dtype {t.dtype}; it must hold integers (token ids, 0/1, -100 for ignored labels)"
            )
        if tuple(t.shape) != shape:
            raise ValueError(f"batch {key} has shape {tuple(t.shape)} but input_ids has {shape}; they must match")
    labels = labels.masked_fill(~_label_positions(mask.to(labels.device) != 0, given is not None), IGNORE_INDEX)
    _check_limits(input_ids, mask, labels, limits, ids)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    if bool((counts == 0).any()):
        bad = [ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise ValueError(
            f"examples {bad[:5]} have no label tokens (labels != -100 after the causal shift): "
            "their loss is undefined. Drop them or give them answer tokens."
        )
    return Batch(input_ids.to(device), mask.to(device), labels.to(device), ids, batch_positions(batch, shape[0]))


def _label_positions(attended: torch.Tensor, given: bool) -> torch.Tensor:
    """(B, T) bool: where a label may be a target.

    Labels made from ``input_ids`` count at attended tokens only. Given labels also count at a
    masked token inside the sequence and at the first masked token after it: codebases that pad
    with eos mask every eos (``attention_mask = input_ids != pad``) yet label the answer's final
    eos, and the model's own loss takes it. Labels in the leading padding, and past that first
    trailing token, never count.
    """
    import torch

    if not given:
        return attended
    pos = torch.arange(attended.shape[1], device=attended.device)
    first = torch.where(attended, pos, attended.shape[1]).min(1, keepdim=True).values
    last = torch.where(attended, pos, -1).max(1, keepdim=True).values
    return attended | ((pos > first) & (pos <= last + 1))


def _check_limits(input_ids, mask, labels, limits: BatchLimits, ids: list) -> None:
    import torch

    def name(rows):
        return [ids[i] for i in torch.nonzero(rows).flatten().tolist()[:5]]

    attended = mask != 0
    if limits.vocab_size is not None:
        bad = ((input_ids >= limits.vocab_size) | (input_ids < 0)) & attended
        if bool(bad.any()):
            raise ValueError(
                f"examples {name(bad.any(1))} hold token ids outside 0..{limits.vocab_size - 1} (the model's "
                f"vocabulary, "
                f"max id {int(input_ids[bad].max())}): encode them with this model's tokenizer"
            )
        bad_labels = (labels >= limits.vocab_size) | ((labels < 0) & (labels != IGNORE_INDEX))
        if bool(bad_labels.any()):
            raise ValueError(
                f"examples {name(bad_labels.any(1))} have labels outside 0..{limits.vocab_size - 1} "
                "and not -100: labels are token ids, -100 where no loss is taken"
            )
    if limits.max_positions is not None and input_ids.shape[1] > limits.max_positions:
        long = attended.sum(1) > limits.max_positions
        raise errors.FastInfluenceError(
            f"examples {name(long) or ids[:1]} are {input_ids.shape[1]} tokens long (with padding) but the model takes "
            f"at most {limits.max_positions} positions: truncate them ({errors.name('max_length')} <= "
            f"{limits.max_positions})",
            "max_length",
        )


def iter_batches(batches: Iterable[dict], device: torch.device, model: nn.Module | None = None) -> Iterator[Batch]:
    """Validated batches (checked against ``model``'s vocabulary and positions when given), each warning
    logged once per call; raises if the iterable holds no example."""
    seen, warned = 0, set()
    limits = BatchLimits.of(model) if model is not None else None
    for raw in batches:
        batch = prepare_batch(raw, device, seen, limits, warned)
        seen += batch.input_ids.shape[0]
        yield batch
    if seen == 0:
        raise ValueError("the batches hold no example: pass a non-empty DataLoader or iterable of batch dicts")
