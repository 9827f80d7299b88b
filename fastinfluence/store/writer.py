"""Writing a feature store: :class:`StoreWriter` consumes feature batches, shard by shard.

The writer never computes features. It tells its caller which examples are still missing
(``plan``: resume and, under ``torch.distributed``, this rank's share), and writes the
feature batches the caller produces for them (``write``)::

    writer = StoreWriter(path, producer.metadata(), tokens=True)
    for run in writer.plan(batches):
        writer.write(run, producer.iter_features(run.batches, run.skip, tokens=True, progress=writer.advance))
    store = writer.close()

:func:`write_store` is that loop for any :class:`~fastinfluence.features.FeatureProducer`; for one
with ``iter_batch_features`` (``GradientExtractor``) it commits batch by batch instead
(``committed`` / ``write_batches``: part files, so a kill inside a window loses one batch).
Resuming scans the shard files, so a run killed at any point continues where it stopped.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .. import distributed as dist
from .. import errors
from ..batching import WindowTracker, batch_ids, batch_positions, data_order, windows
from ..features import FeatureProducer, Features, TokenFactors, cat_features, in_data_order, slice_rows
from ..lm import IGNORE_INDEX
from ..outputs import SHARD_FILE, STORE_SHARDS, is_store_temporary
from .format import (
    MANIFEST,
    MismatchError,
    StoreError,
    _check_format,
    _jsonable,
    _manifest,
    _read_header,
    _save,
    _sha256,
    atomic_write,
    check_same_origin,
    contiguous_shards,
    inside,
    normalize_metadata,
    read_manifest,
    save_tensors,
    scan_shards,
)
from .reader import FeatureStore

log = logging.getLogger("fastinfluence.store")


def _row_digests(stream: list[Mapping], padded: bool = False) -> list[bytes]:
    """One digest per example of what it is made of, so that resuming with other examples at the
    same positions is refused even without ids: its tokens, mask and labels from its first to its
    last attended token (and a label on the token after, which can count), so that neither the
    padding nor the batch it came in changes it. ``padded``: of the whole padded row, as shards
    without ``content_kind`` recorded it."""
    out = []
    for b in stream:
        ids, labels = torch.as_tensor(b["input_ids"]), b.get("labels")
        mask = None if b.get("attention_mask") is None else torch.as_tensor(b["attention_mask"])
        labels = None if labels is None else torch.as_tensor(labels)
        for i in range(len(ids)):
            h = hashlib.sha256()
            if padded:
                for t in (ids, mask, labels):
                    if t is not None:
                        h.update(t[i].to(torch.int64).numpy().tobytes())
                out.append(h.digest()[:16])
                continue
            lo, hi = 0, ids.shape[1]
            if mask is not None and bool(mask[i].any()):
                on = torch.nonzero(mask[i]).flatten()
                lo, hi = int(on[0]), int(on[-1]) + 1
            for t in (ids, mask, labels):
                if t is not None:
                    h.update(t[i, lo:hi].to(torch.int64).numpy().tobytes())
            if labels is not None and hi < labels.shape[1] and int(labels[i, hi]) != IGNORE_INDEX:
                h.update(labels[i, hi : hi + 1].to(torch.int64).numpy().tobytes())
            out.append(h.digest()[:16])
    return out


def _rebased(batch: Mapping, start: int) -> Mapping:
    """``batch`` with its data positions counted from ``start`` (a run's batches start at 0)."""
    positions = batch_positions(batch, len(batch["input_ids"]))
    if positions is None or not start:
        return batch
    return dict(batch, positions=[p - start for p in positions])


def _content(digests: list[bytes], first: int, rows: int) -> str:
    return hashlib.sha256(b"".join(digests[first : first + rows])).hexdigest()


def _content_at(digests: list[bytes], positions: list[int]) -> str:
    return hashlib.sha256(b"".join(digests[p] for p in positions)).hexdigest()


def _token_tensors(tokens: TokenFactors, layers: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of ``tokens`` (``TokenFactors.tensors``) of the layers ``layers``."""
    kept = TokenFactors(
        tokens.offsets,
        {n: tokens.a[n] for n in layers},
        {n: tokens.g[n] for n in layers},
        {n: o for n, o in tokens.entries.items() if n in layers},
        {n: p for n, p in tokens.positions.items() if n in layers},
    )
    return kept.tensors(prefix)


def _write_shard(root: Path, first: int, f: Features, layers: list[str], content: str) -> dict:
    """Write one shard (token file first: the feature shard is the commit record). Returns its entry."""
    entry: dict[str, Any] = {
        "first": first,
        "rows": len(f),
        "ids": _jsonable(f.ids),
        "content": content,
        "content_kind": "span",
        "tokens": None,
    }
    if f.tokens is not None:
        t = _token_tensors(f.tokens, layers)
        entry["tokens"] = _save(root / f"tokens-{first:012d}.safetensors", t)
    tensors = {"features": f.data, "norms": f.norms.float()}
    for n, (A, G, c) in (f.stats or {}).items():
        tensors.update(
            {f"stats.{n}.a": A.double(), f"stats.{n}.g": G.double(), f"stats.{n}.count": torch.tensor([int(c)])}
        )
    entry.update(_save(root / f"shard-{first:012d}.safetensors", tensors, entry))
    return entry


PART_FILE = re.compile(r"part-\d+\.safetensors")


def _write_part(root: Path, positions: list[int], f: Features, layers: list[str], content: str) -> Path:
    """Commit one computed batch whose rows are not in a shard yet: its rows in batch order, their data
    ``positions``, token factors and covariance sums, in one file named by its first data position. A
    resumed writer reads it back instead of recomputing the batch (``_read_part``); once a shard holds
    its rows it is deleted."""
    tensors = {"features": f.data, "norms": f.norms.float()}
    if f.tokens is not None:
        tensors.update(_token_tensors(f.tokens, layers, "tokens."))
    for n, (A, G, c) in (f.stats or {}).items():
        tensors.update({f"stats.{n}.a": A, f"stats.{n}.g": G, f"stats.{n}.count": torch.tensor([int(c)])})
    path = root / f"part-{min(positions):012d}.safetensors"
    _save(path, tensors, {"positions": positions, "ids": _jsonable(f.ids), "content": content})
    return path


def _part_entry(path: Path) -> dict | None:
    """The header entry of a part file (None when it cannot be read: it is only uncommitted work)."""
    try:
        return json.loads(_read_header(path)[0]["__metadata__"]["entry"])
    except (OSError, StoreError, KeyError, TypeError, ValueError):
        return None


def _read_part(path: Path, entry: dict, layers: list[str], like: Mapping) -> Features | None:
    """The Features a part file holds (None when it is unreadable or its checksums fail)."""
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except Exception:  # noqa: BLE001 - a damaged part is recomputed, never trusted
        return None
    if set(t) != set(entry.get("sha256", {})) or any(_sha256(v) != entry["sha256"][k] for k, v in t.items()):
        return None
    tokens = None
    if "tokens.offsets" in t:
        tokens = TokenFactors.from_tensors(t, layers, "tokens.")
    stats = {
        n: (t[f"stats.{n}.a"], t[f"stats.{n}.g"], int(t[f"stats.{n}.count"][0])) for n in layers if f"stats.{n}.a" in t
    }
    return Features(
        t["features"], t["norms"], list(entry["ids"]), like["layout"], None, like["fingerprint"], tokens, stats or None
    )


def _drop_covered_parts(root: Path, shards: list[dict]) -> None:
    """Delete the part files whose rows committed shards hold (left by a kill between a shard and its
    parts' removal, or by a run that wrote its shards by windows)."""
    if not root.is_dir():
        return
    covered = [(e["first"], e["first"] + e["rows"]) for e in shards]
    for p in root.iterdir():
        if not PART_FILE.fullmatch(p.name):
            continue
        entry = _part_entry(p)
        if entry is None or all(any(a <= q < b for a, b in covered) for q in entry.get("positions", [])):
            p.unlink(missing_ok=True)


def _pieces(sizes: list[int], done: list[dict]) -> list[tuple[int, int, int]]:
    """Uncovered example ranges as (batch index, first, stop) pieces in stream order."""
    covered = [(e["first"], e["first"] + e["rows"]) for e in done]
    pieces, pos, c = [], 0, 0
    for b, n in enumerate(sizes):
        lo, hi = pos, pos + n
        while lo < hi:
            while c < len(covered) and covered[c][1] <= lo:
                c += 1
            if c < len(covered) and covered[c][0] <= lo:
                lo = min(hi, covered[c][1])
                continue
            end = min(hi, covered[c][0]) if c < len(covered) else hi
            pieces.append((b, lo, end))
            lo = end
        pos += n
    return pieces


def _runs_for_rank(pieces: list[tuple[int, int, int]], rank: int, world: int) -> list[list[tuple[int, int, int]]]:
    """This rank's share of the pieces (contiguous, by example count), grouped into consecutive runs."""
    total = sum(hi - lo for _, lo, hi in pieces)
    mine, seen = [], 0
    for p in pieces:
        if rank * total <= seen * world < (rank + 1) * total:
            mine.append(p)
        seen += p[2] - p[1]
    runs: list[list] = []
    for p in mine:
        if runs and runs[-1][-1][0] + 1 == p[0] and runs[-1][-1][2] == p[1]:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


class Run(NamedTuple):
    """Consecutive missing examples ``first .. stop`` of the stream: the caller produces the
    features of ``batches`` after their first ``skip`` examples and hands them to ``write``."""

    batches: list[dict]
    skip: int
    first: int
    stop: int


class StoreWriter:
    """Creates, resumes or extends the store at ``path`` with features made as ``metadata`` says.

    The store holds the examples of the batch stream in order; length-bucketed batches
    (with ``positions``, see ``fastinfluence.batching``) in data order. Examples already in
    the store (the same positions) are left out of the plan, so writing again after a
    crash resumes, and writing the old batches followed by new ones appends. Shards hold
    whole batches (whole windows of bucketed batches), about ``shard_rows`` rows each; with
    ``write_batches`` each computed batch whose rows no shard holds yet is committed at once
    as a part file, read back on resume (a kill loses at most the batch in flight).
    Under ``torch.distributed`` the ranks split the remaining examples (whole batches or
    windows), each writes its own shards and rank 0 writes the manifest; every rank must
    plan the same batches.

    Args:
        metadata: config / fingerprint / layout / dtype of the producer (``extractor.metadata()``).
        tokens, covariances: what the feature batches carry (must match an existing store).
        meta: free-form JSON-able dict stored in the manifest (e.g. the data file).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping,
        *,
        tokens: bool = False,
        covariances: bool = False,
        shard_rows: int = 4096,
        meta: dict | None = None,
        progress: bool = False,
    ):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.root, self.shard_dir = Path(path), Path(path) / STORE_SHARDS
        check_layout(self.root)
        self.tokens, self.covariances, self.shard_rows, self.progress = tokens, covariances, shard_rows, progress
        root = self.root
        meta_now = normalize_metadata(metadata)
        self.rank, self.world = dist.rank_world()
        if (root / MANIFEST).exists():
            old = read_manifest(root)
            _check_format(root, old)
            check_same_origin(old, meta_now, f"store {root}", "this extractor")
            if (old["tokens"], old["covariances"]) != (tokens, covariances):
                raise MismatchError(
                    f"store {root} was extracted with "
                    f"{errors.switches(tokens=old['tokens'], covariances=old['covariances'])}; "
                    f"pass the same flags to resume or extend it (got "
                    f"{errors.switches(tokens=tokens, covariances=covariances)})"
                )
            meta = old.get("meta", {}) if meta is None else meta
        self.meta_now = meta_now
        self.layers = list(meta_now["layout"])
        self.dim = max((sl[1] for sl in meta_now["layout"].values()), default=0)
        self.meta = meta or {}
        self._digests: list[bytes] = []
        self._flat_ids: list = []
        self._expected: int | None = None
        self._bar = None
        self._parts: dict | None = None

    def plan(self, batches: Iterable[Mapping]) -> list[Run]:
        """The runs of examples of ``batches`` that this rank still has to write, in stream order.

        Args:
            batches: dicts with ``input_ids`` (B, T) and optional ``ids`` / ``id``; a batch
                without ids gets its stream positions as ids.
        """
        root, shard_dir, rank, world = self.root, self.shard_dir, self.rank, self.world
        batches = list(batches)
        for i, b in enumerate(batches):
            if not isinstance(b, Mapping) or "input_ids" not in b:
                raise TypeError(
                    f"batch {i} must be a dict with 'input_ids' (got {type(b).__name__}); build batches as the "
                    f"tokenizer returns them"
                )
        # The store holds the examples in data order: a window of length-bucketed batches
        # (fastinfluence.batching) is the unit of the plan, as a batch is for batches in order.
        wins = windows(batches)
        sizes = [sum(len(batches[i]["input_ids"]) for i in w) for w in wins]
        stream, pos = [], 0
        for b in batches:
            n = len(b["input_ids"])
            ids = batch_ids(b, n, pos)
            stream.append(dict(b, ids=ids) if "ids" not in b else b)
            pos += n
        order = data_order([(len(b["input_ids"]), batch_positions(b, len(b["input_ids"]))) for b in stream])
        dist.barrier()  # every rank has read the old manifest before rank 0 rewrites it
        if rank == 0:
            shard_dir.mkdir(parents=True, exist_ok=True)
            for p in leftovers(root):  # left by a killed run; removed before any rank writes
                p.unlink(missing_ok=True)
        dist.barrier()
        done = scan_shards(shard_dir)
        flat_ids = [i for s in stream for i in s["ids"]]
        flat_ids = [flat_ids[i] for i in order]
        digests = _row_digests(stream)
        digests = self._digests = [digests[i] for i in order]
        self._flat_ids = flat_ids
        old_digests = None
        self._expected = len(flat_ids)
        for e in done:
            past_end = e["first"] + e["rows"] > len(flat_ids)
            if "content" in e and e.get("content_kind") != "span" and old_digests is None:
                old_digests = _row_digests(stream, padded=True)
                old_digests = [old_digests[i] for i in order]
            ref = digests if e.get("content_kind") == "span" else old_digests
            if (
                past_end
                or _jsonable(flat_ids[e["first"] : e["first"] + e["rows"]]) != e["ids"]
                or ("content" in e and _content(ref, e["first"], e["rows"]) != e["content"])
            ):
                raise MismatchError(
                    f"store {root} holds examples {e['first']}..{e['first'] + e['rows']} (shard {e.get('file')}) "
                    f"whose ids or "
                    "tokens differ from these batches at the same positions (or lie past their end): pass the same "
                    "batches "
                    "to resume, or the old batches followed by new ones to append"
                )
        if rank == 0:  # a manifest from the start, so that a killed first run can be checked on resume
            _drop_covered_parts(shard_dir, done)
            atomic_write(root / MANIFEST, json.dumps(self._manifest(contiguous_shards(done), len(flat_ids))).encode())
        pieces = _pieces(sizes, done)
        if rank == 0 and done:
            log.info(
                "store %s: %d of %d examples already extracted, %d to go",
                root,
                len(flat_ids) - sum(p[2] - p[1] for p in pieces),
                len(flat_ids),
                sum(p[2] - p[1] for p in pieces),
            )
        windowed = [[stream[i] for i in w] for w in wins]
        runs = [self._run(windowed, sizes, r) for r in _runs_for_rank(pieces, rank, world)]
        self._bar = _progress(sum(r.stop - r.first for r in runs), self.progress and rank == 0)
        return runs

    def _run(self, windowed, sizes, run) -> Run:
        w0, first, _ = run[0]
        w_last, _, stop = run[-1]
        start_of = sum(sizes[:w0])
        skip = first - start_of
        if self.covariances and (skip or stop != sum(sizes[: w_last + 1])):
            raise StoreError(
                f"store {self.root} ends inside a batch (examples {first}..{stop}): covariance sums are per batch, "
                "so resume with the same batch size as the interrupted run"
            )
        batches = [_rebased(b, start_of) for w in windowed[w0 : w_last + 1] for b in w]
        return Run(batches, skip, first, stop)

    def advance(self, examples: int) -> None:
        """The producer computed ``examples`` more examples (per batch: the bar moves inside a window)."""
        self._bar.update(examples)

    def write(self, run: Run, features: Iterable[Features], counted: bool = False) -> None:
        """Write the features of ``run`` (one ``Features`` per batch, the skipped examples left
        out, as ``FeatureProducer.iter_features`` yields them) as shards of whole batches.
        ``counted``: the producer reports its progress through ``advance``; else the bar counts
        the rows as they arrive."""
        first, stop = run.first, run.stop
        parts: list[Features] = []
        pos = shard_first = first
        for f in features:
            if pos + len(f) > stop:
                f = slice_rows(f, 0, stop - pos)
            parts.append(f)
            pos += len(f)
            if not counted:
                self._bar.update(len(f))
            if pos - shard_first >= self.shard_rows or pos == stop:
                _write_shard(
                    self.shard_dir,
                    shard_first,
                    cat_features(parts),
                    self.layers,
                    _content(self._digests, shard_first, pos - shard_first),
                )
                parts, shard_first = [], pos
            if pos >= stop:
                break
        if pos != stop:
            raise StoreError(
                f"the extractor yielded {pos - first} rows for examples {first}..{stop}; expected {stop - first}"
            )

    def committed(self, run: Run) -> set[int]:
        """Data positions of ``run`` (counted as in ``run.batches``) whose batches a killed writer
        committed as part files: pass them to the producer as ``done`` (``write_batches`` reads
        their rows back)."""
        self._parts = self._matching_parts(run)
        base = run.first - run.skip
        return {p - base for positions in self._parts for p in positions}

    def _matching_parts(self, run: Run) -> dict[tuple[int, ...], tuple[Path, dict]]:
        """The part files holding exactly a batch of ``run`` (by its data positions), checked against
        the batches' ids and tokens like shards; others are left for the writer that matches them."""
        base, tracker, wanted = run.first - run.skip, WindowTracker(), set()
        for b in run.batches:
            n = len(b["input_ids"])
            positions = batch_positions(b, n) or tracker.following(n)
            tracker.add(n, positions)
            wanted.add(tuple(sorted(p + base for p in positions)))
        found = {}
        for p in sorted(self.shard_dir.glob("part-*.safetensors")):
            entry = _part_entry(p) if PART_FILE.fullmatch(p.name) else None
            key = tuple(sorted(entry.get("positions", []))) if entry is not None else ()
            if key not in wanted:
                continue
            positions = entry["positions"]
            if key[-1] >= len(self._flat_ids) or (
                _jsonable([self._flat_ids[q] for q in positions]) != entry["ids"]
                or _content_at(self._digests, positions) != entry["content"]
            ):
                raise MismatchError(
                    f"store {self.root} holds the computed batch {p.name} of examples {positions[:5]} whose ids or "
                    "tokens differ from these batches at the same positions: pass the same batches to resume"
                )
            found[key] = (p, entry)
        return found

    def write_batches(self, run: Run, batches: Iterable[tuple[list[int], Features | None, bool]]) -> None:
        """Write the features of ``run`` from its batches one by one, as
        ``GradientExtractor.iter_batch_features(run.batches, run.skip, done=writer.committed(run))``
        yields them (positions, Features or None, closes a window): every computed batch whose rows
        no shard takes yet is committed at once as a part file, so a kill inside a window of
        length-bucketed batches (or before ``shard_rows`` rows) loses at most the batch in flight;
        the batches ``committed`` named are read back from their part files. Shards hold whole
        windows in data order, as ``write`` writes them; their part files are deleted after them."""
        first, stop, base = run.first, run.stop, run.first - run.skip
        parts = self._parts
        if parts is None:
            parts = self._matching_parts(run)
        self._parts = None
        window: list[tuple[list[int], Features]] = []
        ready: list[Features] = []
        held: list[Path] = []  # part files of rows not in a shard yet
        pos = shard_first = first
        for positions, f, closes in batches:
            positions = [p + base for p in positions]
            key = tuple(sorted(positions))
            fresh = f is not None
            if f is None and key in parts:
                path, entry = parts.pop(key)
                f = _read_part(path, entry, self.layers, self.meta_now)
                if f is None:
                    raise StoreError(
                        f"store {self.root}: the computed batch {path.name} became unreadable while resuming; run "
                        "the extraction again (it is then recomputed)"
                    )
                held.append(path)
                self._bar.update(sum(first <= q < stop for q in positions))
            if f is not None:
                window.append((positions, f))
            shard_now = False
            if closes and window:
                w = in_data_order(window, first)
                window = []
                if pos + len(w) > stop:
                    w = slice_rows(w, 0, stop - pos)
                if len(w):
                    ready.append(w)
                    pos += len(w)
                if ready and (pos - shard_first >= self.shard_rows or pos >= stop):
                    _write_shard(
                        self.shard_dir,
                        shard_first,
                        cat_features(ready),
                        self.layers,
                        _content(self._digests, shard_first, pos - shard_first),
                    )
                    for path in held:
                        path.unlink(missing_ok=True)
                    ready, held, shard_first, shard_now = [], [], pos, True
            if fresh and not shard_now and any(first <= q < stop for q in positions):
                held.append(
                    _write_part(self.shard_dir, positions, f, self.layers, _content_at(self._digests, positions))
                )
            if pos >= stop:
                break
        if pos != stop:
            raise StoreError(
                f"the extractor yielded {pos - first} rows for examples {first}..{stop}; expected {stop - first}"
            )

    def close(self) -> FeatureStore:
        """Write the manifest of every shard written so far (rank 0) and open the store."""
        if self._bar is not None:
            self._bar.close()
        dist.barrier()
        if self.rank == 0:
            shards = scan_shards(self.shard_dir)
            atomic_write(self.root / MANIFEST, json.dumps(self._manifest(shards, self._expected)).encode())
            _drop_covered_parts(self.shard_dir, shards)
        dist.barrier()
        return FeatureStore.open(self.root)

    def _manifest(self, shards: list[dict], expected: int | None) -> dict:
        return _manifest(self.meta_now, self.dim, self.tokens, self.covariances, self.meta, shards, expected)


def check_layout(root: Path) -> None:
    """The store's manifest and ``shards`` directory are its own, not links: through a link the writer
    would write (and clean up) in another directory."""
    for p in (root / MANIFEST, root / STORE_SHARDS):
        if p.is_symlink():
            raise StoreError(
                f"store {root}: {p} is a link to {p.resolve()}; a store is written only into its own directory: "
                "replace the link with the directory or file itself, or write a new store"
            )


def leftovers(root: Path) -> list[Path]:
    """Temporary files a killed writer of this store left: its manifest's and shards' temporary names
    (``outputs.is_store_temporary``), never another file."""
    shard_dir = root / STORE_SHARDS
    found = [p for p in root.iterdir() if is_store_temporary(p.name, MANIFEST)] if root.is_dir() else []
    if shard_dir.is_dir():
        found += [p for p in shard_dir.iterdir() if is_store_temporary(p.name, SHARD_FILE)]
    return found


def write_store(
    path: str | os.PathLike, extractor: FeatureProducer, batches: Iterable[Mapping], **kwargs
) -> FeatureStore:
    """``_write_store`` under the store's lock: a second, independent writer is refused (``store_lock``).
    ``path`` must be a new or empty directory or a store to resume or extend (``outputs.check_store_dir``)."""
    from .lock import writing

    with writing(path):
        return _write_store(path, extractor, batches, **kwargs)


def write_features(
    path: str | os.PathLike,
    metadata: Mapping,
    batches: list[Mapping],
    features: Features,
    *,
    shard_rows: int = 4096,
    meta: dict | None = None,
) -> FeatureStore:
    """A store of features already computed (the training callback's rows), pushed into the writer:
    ``features`` hold one row per example of ``batches`` in data order (batches without
    ``positions``). Under the store's lock; resumes (a replayed interval rewrites nothing that is
    complete, completes what a killed writer left) as ``write_store`` does."""
    from .lock import writing

    ends = list(itertools.accumulate(len(b["input_ids"]) for b in batches))
    with writing(path):
        writer = StoreWriter(path, metadata, shard_rows=shard_rows, meta=meta)
        for run in writer.plan(batches):  # batch by batch, as a producer yields them: shards of whole batches
            cuts = [run.first] + [e for e in ends if run.first < e < run.stop] + [run.stop]
            writer.write(run, [slice_rows(features, a, b) for a, b in zip(cuts, cuts[1:])])
        return writer.close()


def _write_store(
    path: str | os.PathLike,
    extractor: FeatureProducer,
    batches: Iterable[Mapping],
    *,
    tokens: bool = False,
    covariances: bool = False,
    shard_rows: int = 4096,
    meta: dict | None = None,
    progress: bool = False,
) -> FeatureStore:
    """Features of ``batches`` from ``extractor`` into the store at ``path`` (created, resumed or
    extended; see :class:`StoreWriter`). Every rank of a ``torch.distributed`` program passes
    the same batches."""
    writer = StoreWriter(
        path,
        extractor.metadata(),
        tokens=tokens,
        covariances=covariances,
        shard_rows=shard_rows,
        meta=meta,
        progress=progress,
    )
    per_batch = callable(getattr(extractor, "iter_batch_features", None))
    for run in writer.plan(batches):
        if per_batch:  # committed batch by batch (part files), the bar moving per batch
            writer.write_batches(
                run,
                extractor.iter_batch_features(
                    run.batches,
                    skip_examples=run.skip,
                    done=writer.committed(run),
                    tokens=tokens,
                    covariances=covariances,
                    progress=writer.advance,
                ),
            )
            continue
        # A producer that reports per batch moves the bar inside a window; others per yielded rows.
        counted = "progress" in inspect.signature(extractor.iter_features).parameters
        extra = {"progress": writer.advance} if counted else {}
        features = extractor.iter_features(
            run.batches, skip_examples=run.skip, tokens=tokens, covariances=covariances, **extra
        )
        writer.write(run, features, counted=counted)
    return writer.close()


def write_cache(
    store: FeatureStore, group: str, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Save tensors derived from the store's rows (a fitted preconditioner) as
    ``<group>/<name>.safetensors`` beside its shards, atomically; returns the file's path.

    A cache is valid while ``metadata`` still matches (compare it with ``store.read_cache``);
    raises OSError when the store directory is read-only.
    """
    path = store.path / group / f"{name}.safetensors"
    path.parent.mkdir(exist_ok=True)
    if not inside(store.path, path):
        raise StoreError(
            f"store {store.path}: {path.parent} links to {path.parent.resolve()}, outside the store; the cache is "
            "not written there: replace the link with a directory"
        )
    save_tensors(path, tensors, metadata)
    return path


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", desc="extract", disable=not enabled)
