"""On-disk feature store: safetensors shards under a JSON manifest.

Layout of a store directory::

    manifest.json                      format version, config, fingerprint, layout, dtype, shards
    shards/shard-<first>.safetensors   features (n, D), norms (n,) float32, covariance sums
    shards/tokens-<first>.safetensors  per-token factors of the same rows (optional)
    precondition/<kind>.safetensors    fitted preconditioners (see ``precondition.py``)

``<first>`` is the position of the shard's first example in the extraction stream, so
shard names are unique across ranks and runs. Every shard is written to a temporary file,
flushed, fsynced and renamed: a shard file that exists is whole, and the shard file is the
record that its rows are done (its safetensors header repeats its manifest entry). Resuming
scans the shard files, so a run killed at any point continues where it stopped.

Checksums are SHA-256 per tensor, kept in the manifest. ``verify()`` checks them all;
reading a whole shard (``iter_chunks``) checks the bytes it reads, and every read checks
the file size and header.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import save as safetensors_save

from . import distributed as dist
from .config import ProjectionConfig
from .capture import batch_ids
from .features import Chunk, Features, LayerSlice, cat_features, slice_rows

FORMAT = "fastinfluence.store"
VERSION = 1
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


class StoreError(RuntimeError):
    """A feature store is missing, incomplete or unusable."""


class CorruptShardError(StoreError):
    """A shard's bytes do not match its manifest entry (truncated or corrupted)."""


class MismatchError(ValueError):
    """Two sets of features (or a store and an extractor) were made differently."""


# ----------------------------------------------------------------------------- metadata


def layout_to_json(layout: Mapping[str, LayerSlice]) -> dict:
    return {name: [sl.start, sl.stop, list(sl.shape)] for name, sl in layout.items()}


def layout_from_json(d: Mapping[str, list]) -> dict[str, LayerSlice]:
    return {name: LayerSlice(int(a), int(b), (int(s[0]), int(s[1]))) for name, (a, b, s) in d.items()}


def _jsonable(x: Any) -> Any:
    """Plain JSON types (tuples to lists, LayerSlice to lists) so metadata compares equal after a round trip."""
    if isinstance(x, ProjectionConfig):
        return _jsonable(x.to_dict())
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def normalize_metadata(meta: Mapping) -> dict:
    """config / fingerprint / layout / dtype of an extractor, Features or store, as plain JSON."""
    layout = meta["layout"]
    if layout and isinstance(next(iter(layout.values())), LayerSlice):
        layout = layout_to_json(layout)
    dtype = meta["dtype"]
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return _jsonable({"config": meta["config"], "fingerprint": meta["fingerprint"], "layout": layout, "dtype": dtype})


def features_metadata(f: Features) -> dict:
    return normalize_metadata({"config": f.config, "fingerprint": f.fingerprint or {}, "layout": f.layout, "dtype": f.data.dtype})


def _first_difference(a: Any, b: Any, path: str, names: tuple[str, str]) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}[{key!r}] is present only in {names[0] if key in a else names[1]}"
            diff = _first_difference(a[key], b[key], f"{path}[{key!r}]", names)
            if diff:
                return diff
        return None
    if a != b:
        return f"{path} is {a!r} in {names[0]} but {b!r} in {names[1]}"
    return None


def check_same_origin(first: Mapping, second: Mapping, first_name: str, second_name: str) -> None:
    """Raise MismatchError naming the first difference in config, fingerprint, layout or dtype."""
    a, b = normalize_metadata(first), normalize_metadata(second)
    for key in ("layout", "fingerprint", "config", "dtype"):
        diff = _first_difference(a[key], b[key], key, (first_name, second_name))
        if diff:
            what = {"fingerprint": "model", "layout": "layer set", "config": "projection config", "dtype": "storage dtype"}[key]
            raise MismatchError(
                f"{first_name} and {second_name} were made with a different {what}: {diff}; "
                "extract both with the same model, layers and ProjectionConfig"
            )


# ----------------------------------------------------------------------------- file I/O


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _read_header(path: Path) -> tuple[dict, int]:
    """(safetensors header, byte offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptShardError(f"shard {path} is truncated ({len(raw)} bytes): re-extract it or restore the file")
        n = int.from_bytes(raw, "little")
        body = f.read(n)
    try:
        if len(body) != n:
            raise ValueError("short header")
        return json.loads(body), 8 + n
    except ValueError as exc:
        raise CorruptShardError(f"shard {path} has an unreadable header ({exc}): the file is truncated or corrupted") from exc


class _ShardFile:
    """One safetensors file checked against its manifest entry; tensors are read with pread."""

    def __init__(self, path: Path, size: int, checksums: Mapping[str, str]):
        self.path = path
        self.checksums = checksums
        actual = path.stat().st_size if path.exists() else -1
        if actual != size:
            state = "missing" if actual < 0 else f"{actual} bytes, the manifest says {size}"
            raise CorruptShardError(f"shard {path} is {state}: it is truncated or was replaced; restore it or re-extract the store")
        self.header, self.base = _read_header(path)
        missing = set(checksums) - set(self.header)
        if missing:
            raise CorruptShardError(f"shard {path} lacks tensors {sorted(missing)} listed in the manifest")

    def spec(self, name: str) -> tuple[torch.dtype, list[int], int, int]:
        h = self.header[name]
        begin, end = h["data_offsets"]
        return _ST_DTYPES[h["dtype"]], h["shape"], self.base + begin, self.base + end

    def read_bytes(self, fd: int, begin: int, end: int) -> torch.Tensor:
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], begin + got)
            if n == 0:
                raise CorruptShardError(f"shard {self.path} ended early while reading bytes {begin}..{end}")
            got += n
        return buf

    def tensor(self, name: str, rows: slice | None = None, check: bool = True) -> torch.Tensor:
        """Tensor ``name`` (rows ``rows`` of it when given; a whole tensor is checked against its checksum)."""
        dtype, shape, begin, end = self.spec(name)
        row_bytes = (end - begin) // max(shape[0], 1) if shape else 0
        lo, hi = (0, shape[0]) if rows is None else (rows.start, rows.stop)
        with open(self.path, "rb") as f:
            buf = self.read_bytes(f.fileno(), begin + lo * row_bytes, begin + hi * row_bytes)
        if rows is None and check and hashlib.sha256(buf.numpy()).hexdigest() != self.checksums[name]:
            raise CorruptShardError(f"shard {self.path}: tensor {name!r} does not match its checksum; the file is corrupted")
        return buf.view(dtype).reshape([hi - lo, *shape[1:]] if shape else shape)

    def memmap(self, name: str) -> torch.Tensor:
        """Tensor ``name`` memory-mapped copy-on-write from the read-only file (nothing read until used)."""
        dtype, shape, begin, end = self.spec(name)
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=begin, shape=(end - begin,))
        return torch.from_numpy(raw).view(dtype).view(shape)

    def verify(self) -> None:
        for name in self.checksums:
            self.tensor(name)


# ----------------------------------------------------------------------------- the store


def read_manifest(path: Path) -> dict:
    """The manifest of the store at ``path``; StoreError naming the file when it is absent or not JSON."""
    if path.is_file():
        raise StoreError(f"{path} is a file, not a feature store directory; give the directory that holds {MANIFEST}")
    if not path.exists():
        raise StoreError(f"no feature store at {path}: no such directory (extract one with GradientExtractor.extract(batches, store=...))")
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StoreError(f"no feature store at {path}: {MANIFEST} is missing (extract one with GradientExtractor.extract(batches, store=...))") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path / MANIFEST} is not valid JSON ({exc}): the manifest is damaged; re-run the extraction into {path} to rewrite it") from None


class FeatureStore:
    """Read-only view of a feature store directory (see module docstring).

    Attributes:
        path: the store directory.
        config, fingerprint, layout, dtype (torch dtype), dim (D), num_rows (N).
        ids: N example ids in row order. meta: free-form dict given at extraction.
        has_tokens, has_covariances: what was extracted.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.config = ProjectionConfig.from_dict(manifest["config"])
        self.fingerprint = manifest["fingerprint"]
        self.layout = layout_from_json(manifest["layout"])
        self.dtype = getattr(torch, manifest["dtype"])
        self.dim = int(manifest["dim"])
        self.shards = manifest["shards"]
        self.has_tokens = bool(manifest["tokens"])
        self.has_covariances = bool(manifest["covariances"])
        self.meta = manifest.get("meta", {})
        self.complete = bool(manifest.get("complete", True))  # False while (or after a killed) extraction runs
        self.expected_rows = int(manifest.get("expected_rows", manifest.get("num_rows", 0)))
        self.ids = [i for s in self.shards for i in s["ids"]]
        self.num_rows = sum(s["rows"] for s in self.shards)
        self._starts = [s["first"] for s in self.shards]
        self._norms: torch.Tensor | None = None
        self._mapped: dict[int, torch.Tensor] = {}
        expected = 0
        for s in self.shards:
            if s["first"] != expected:
                raise StoreError(
                    f"store {path} is incomplete: examples {expected}..{s['first']} are missing; "
                    "resume the extraction with the same batches to fill them"
                )
            expected += s["rows"]

    @classmethod
    def open(cls, path: str | os.PathLike, expect: Mapping | None = None) -> "FeatureStore":
        """Open the store at ``path`` read-only.

        ``expect``: metadata (``extractor.metadata()``, a Features' or store's) that the store
        must match; a store made with a different model, layer set or config is refused.
        """
        path = Path(path)
        manifest = read_manifest(path)
        _check_format(path, manifest)
        store = cls(path, manifest)
        if expect is not None:
            check_same_origin(store.metadata(), expect, f"store {path}", "the given extractor/features")
        return store

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={self.num_rows}, dim={self.dim}, dtype={self.manifest['dtype']}, shards={len(self.shards)})"

    def metadata(self) -> dict:
        return {k: self.manifest[k] for k in ("config", "fingerprint", "layout", "dtype")}

    def _shard(self, i: int, kind: str = "shard") -> _ShardFile:
        s = self.shards[i]
        if kind == "tokens":
            return _ShardFile(self.path / "shards" / s["tokens"]["file"], s["tokens"]["bytes"], s["tokens"]["sha256"])
        return _ShardFile(self.path / "shards" / s["file"], s["bytes"], s["sha256"])

    def _locate(self, row: int) -> int:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is outside the store's {self.num_rows} rows")
        return bisect.bisect_right(self._starts, row) - 1

    @property
    def norms(self) -> torch.Tensor:
        """(N,) float32 L2 norms of all rows (read once, checked)."""
        if self._norms is None:
            self._norms = torch.cat([self._shard(i).tensor("norms") for i in range(len(self.shards))]) if self.shards else torch.empty(0)
        return self._norms

    def iter_chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        """Consecutive blocks of at most ``rows`` rows of [start, stop), never across shards.

        Reads ahead one chunk on a thread. A shard read whole is checked against its
        checksum; the error (naming the shard) comes at the end of that shard.
        """
        if rows < 1:
            raise ValueError(f"iter_chunks: rows must be >= 1, got {rows}")
        stop = self.num_rows if stop is None else stop
        plan = []
        for i, s in enumerate(self.shards):
            lo, hi = max(start, s["first"]), min(stop, s["first"] + s["rows"])
            for a in range(lo, hi, rows):
                plan.append((i, a - s["first"], min(a + rows, hi) - s["first"], lo == s["first"] and hi == s["first"] + s["rows"]))
        with ThreadPoolExecutor(1) as pool:
            state: dict[int, Any] = {}
            pending = pool.submit(self._read_chunk, plan[0], state) if plan else None
            for k in range(len(plan)):
                chunk = pending.result()
                pending = pool.submit(self._read_chunk, plan[k + 1], state) if k + 1 < len(plan) else None
                yield chunk

    def _read_chunk(self, item: tuple[int, int, int, bool], state: dict) -> Chunk:
        i, a, b, whole = item
        if state.get("index") != i:
            shard = self._shard(i)
            state.update(index=i, shard=shard, hash=hashlib.sha256() if whole else None, norms=shard.tensor("norms"))
        shard: _ShardFile = state["shard"]
        dtype, shape, begin, _ = shard.spec("features")
        row_bytes = shape[1] * dtype.itemsize
        with open(shard.path, "rb") as f:
            buf = shard.read_bytes(f.fileno(), begin + a * row_bytes, begin + b * row_bytes)
        if state["hash"] is not None:
            state["hash"].update(buf.numpy())
            if b == shape[0] and state["hash"].hexdigest() != shard.checksums["features"]:
                raise CorruptShardError(f"shard {shard.path}: features do not match their checksum; the file is corrupted (run FeatureStore.verify())")
        first = self.shards[i]["first"]
        return Chunk(first + a, buf.view(dtype).view(b - a, shape[1]), state["norms"][a:b])

    def shard_features(self, i: int) -> torch.Tensor:
        """(rows, D) features of shard ``i``, memory-mapped (size and header checked, bytes not hashed)."""
        if i not in self._mapped:
            self._mapped[i] = self._shard(i).memmap("features")
        return self._mapped[i]

    def rows(self, indices: Iterable[int]) -> torch.Tensor:
        """(len(indices), D) feature rows in the storage dtype, read at random through the memory maps."""
        indices = [int(i) for i in indices]
        out = torch.empty(len(indices), self.dim, dtype=self.dtype)
        for j, r in enumerate(indices):
            i = self._locate(r)
            out[j] = self.shard_features(i)[r - self.shards[i]["first"]]
        return out

    def token_factors(self, row: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-token factors of one example: ({layer: A~ (T, k_in)}, {layer: G~ (T, k_out)})."""
        if not self.has_tokens:
            raise StoreError(f"store {self.path} has no per-token factors: extract with tokens=True to get per-token scores")
        i = self._locate(row)
        shard = self._shard(i, "tokens")
        offsets = shard.tensor("offsets")
        a = row - self.shards[i]["first"]
        span = slice(int(offsets[a]), int(offsets[a + 1]))
        return (
            {n: shard.tensor(f"a.{n}", span) for n in self.layout},
            {n: shard.tensor(f"g.{n}", span) for n in self.layout},
        )

    def stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """Per layer (sum a~a~^T (k_in, k_in), sum g~g~^T (k_out, k_out), token count), float64, over all shards."""
        if not self.has_covariances:
            raise StoreError(f"store {self.path} has no covariance sums: extract with covariances=True to fit kfac/ekfac")
        total: dict[str, list] = {}
        for i in range(len(self.shards)):
            shard = self._shard(i)
            for n in self.layout:
                A, G, c = (shard.tensor(f"stats.{n}.{p}") for p in ("a", "g", "count"))
                t = total.setdefault(n, [0, 0, 0])
                t[0], t[1], t[2] = t[0] + A, t[1] + G, t[2] + int(c[0])
        return {n: (a, g, c) for n, (a, g, c) in total.items()}

    def verify(self) -> dict:
        """Check the size, header and every tensor checksum of every shard; raises CorruptShardError naming the shard.

        Returns ``{"rows", "shards", "files", "bytes", "complete"}``: what was checked."""
        files = size = 0
        for i, s in enumerate(self.shards):
            self._shard(i).verify()
            files, size = files + 1, size + s["bytes"]
            if s.get("tokens"):
                self._shard(i, "tokens").verify()
                files, size = files + 1, size + s["tokens"]["bytes"]
        return {"rows": self.num_rows, "shards": len(self.shards), "files": files, "bytes": size, "complete": self.complete}

    def to_features(self) -> Features:
        """The whole store in memory (for small stores: queries)."""
        data = torch.cat([c.data for c in self.iter_chunks(1 << 16)]) if self.num_rows else torch.empty(0, self.dim, dtype=self.dtype)
        return Features(data, self.norms.clone(), list(self.ids), self.layout, self.config, self.fingerprint)


def iter_chunks(source: "Features | FeatureStore", rows: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
    """Chunks of rows [start, stop) of a store or of in-memory Features (global row offsets)."""
    if isinstance(source, FeatureStore):
        yield from source.iter_chunks(rows, start, stop)
        return
    stop = source.num_rows if stop is None else stop
    if (start, stop) == (0, source.num_rows):
        yield from source.iter_chunks(rows)
        return
    part = replace(source, data=source.data[start:stop], norms=source.norms[start:stop], ids=source.ids[start:stop], tokens=None, stats=None)
    for c in part.iter_chunks(rows):
        yield c._replace(offset=c.offset + start)


def source_metadata(source: "Features | FeatureStore") -> dict:
    return source.metadata() if isinstance(source, FeatureStore) else features_metadata(source)


# ----------------------------------------------------------------------------- writing


def _save(path: Path, tensors: dict[str, torch.Tensor], entry: dict | None = None) -> dict:
    """Write ``tensors`` atomically; ``entry`` (with the checksums added) goes into the header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    checksums = {k: _sha256(v) for k, v in tensors.items()}
    metadata = {"entry": json.dumps(dict(entry, sha256=checksums))} if entry is not None else None
    data = safetensors_save(tensors, metadata=metadata)
    atomic_write(path, data)
    return {"file": path.name, "bytes": len(data), "sha256": checksums}


def _check_format(path: Path, manifest: Mapping) -> None:
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise StoreError(
            f"{path / MANIFEST} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this fastinfluence reads and writes {FORMAT!r} version {VERSION}"
        )


def _row_digests(stream: list[Mapping]) -> list[bytes]:
    """One digest per example of what it is made of (its tokens, mask and labels), so that
    resuming with other examples at the same positions is refused even without ids."""
    out = []
    for b in stream:
        fields = [torch.as_tensor(b[k]) for k in ("input_ids", "attention_mask", "labels") if b.get(k) is not None]
        for i in range(len(fields[0])):
            h = hashlib.sha256()
            for t in fields:
                h.update(t[i].to(torch.int64).numpy().tobytes())
            out.append(h.digest()[:16])
    return out


def _content(digests: list[bytes], first: int, rows: int) -> str:
    return hashlib.sha256(b"".join(digests[first : first + rows])).hexdigest()


def _write_shard(root: Path, first: int, f: Features, layers: list[str], content: str) -> dict:
    """Write one shard (token file first: the feature shard is the commit record). Returns its entry."""
    entry: dict[str, Any] = {"first": first, "rows": len(f), "ids": _jsonable(f.ids), "content": content, "tokens": None}
    if f.tokens is not None:
        t = {"offsets": f.tokens.offsets.to(torch.int64)}
        t.update({f"a.{n}": f.tokens.a[n] for n in layers})
        t.update({f"g.{n}": f.tokens.g[n] for n in layers})
        entry["tokens"] = _save(root / f"tokens-{first:012d}.safetensors", t)
    tensors = {"features": f.data, "norms": f.norms.float()}
    for n, (A, G, c) in (f.stats or {}).items():
        tensors.update({f"stats.{n}.a": A.double(), f"stats.{n}.g": G.double(), f"stats.{n}.count": torch.tensor([int(c)])})
    entry.update(_save(root / f"shard-{first:012d}.safetensors", tensors, entry))
    return entry


def _scan_shards(root: Path) -> list[dict]:
    """Entries of every committed shard file (read from their headers), in stream order."""
    entries = []
    for p in sorted(root.glob("shard-*.safetensors")):
        header, _ = _read_header(p)
        entry = json.loads(header["__metadata__"]["entry"])
        entry.update(file=p.name, bytes=p.stat().st_size)
        entries.append(entry)
    entries.sort(key=lambda e: e["first"])
    for a, b in zip(entries, entries[1:]):
        if a["first"] + a["rows"] > b["first"]:
            raise StoreError(f"shards {a['file']} and {b['file']} overlap in {root}: the store was written by two different runs")
    return entries


def _contiguous(entries: list[dict]) -> list[dict]:
    """The shards that cover examples 0..n without a gap (what a reader may use)."""
    out, expected = [], 0
    for e in entries:
        if e["first"] != expected:
            break
        out.append(e)
        expected += e["rows"]
    return out


def _manifest(meta: dict, dim: int, tokens: bool, covariances: bool, user_meta: dict, shards: list[dict],
              expected: int | None = None) -> dict:
    rows = sum(s["rows"] for s in shards)
    return {
        "format": FORMAT,
        "version": VERSION,
        **meta,
        "dim": dim,
        "tokens": tokens,
        "covariances": covariances,
        "meta": user_meta,
        "num_rows": rows,
        "expected_rows": rows if expected is None else expected,  # the extraction's example count
        "complete": expected is None or rows == expected,
        "shards": shards,
    }


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


def write_store(path: str | os.PathLike, extractor, batches: Iterable[Mapping], **kwargs) -> FeatureStore:
    """``_write_store`` under the store's lock: a second, independent writer is refused (``store_lock``)."""
    from .store_lock import writing

    with writing(path):
        return _write_store(path, extractor, batches, **kwargs)


def _write_store(
    path: str | os.PathLike,
    extractor,
    batches: Iterable[Mapping],
    *,
    tokens: bool = False,
    covariances: bool = False,
    shard_rows: int = 4096,
    meta: dict | None = None,
    progress: bool = False,
) -> FeatureStore:
    """Extract features of ``batches`` into the store at ``path`` (created, resumed or extended).

    The store holds the examples of the batch stream in order. Examples already in the
    store (the same stream positions) are skipped, so calling it again after a crash
    resumes, and calling it with the old batches followed by new ones appends. Shards hold
    whole batches, about ``shard_rows`` rows each. Under ``torch.distributed`` the ranks
    split the remaining examples (whole batches), each writes its own shards and rank 0
    writes the manifest; every rank must pass the same batches.

    Args:
        extractor: has ``metadata()`` and ``iter_features(batches, skip_examples=, tokens=, covariances=)``.
        batches: dicts with ``input_ids`` (B, T) and optional ``ids`` / ``id``; a batch
            without ids gets its stream positions as ids.
        meta: free-form JSON-able dict stored in the manifest (e.g. the data file).
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    root, shard_dir = Path(path), Path(path) / "shards"
    batches = list(batches)
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise TypeError(f"batch {i} must be a dict with 'input_ids' (got {type(b).__name__}); build batches as the tokenizer returns them")
    sizes = [len(b["input_ids"]) for b in batches]
    stream, pos = [], 0
    for b, n in zip(batches, sizes):
        ids = batch_ids(b, n, pos)
        stream.append(dict(b, ids=ids) if "ids" not in b else b)
        pos += n
    meta_now = normalize_metadata(extractor.metadata())
    rank, world = dist.rank_world()

    if (root / MANIFEST).exists():
        old = read_manifest(root)
        _check_format(root, old)
        check_same_origin(old, meta_now, f"store {root}", "this extractor")
        if (old["tokens"], old["covariances"]) != (tokens, covariances):
            raise MismatchError(
                f"store {root} was extracted with tokens={old['tokens']}, covariances={old['covariances']}; "
                f"pass the same flags to resume or extend it (got tokens={tokens}, covariances={covariances})"
            )
        meta = old.get("meta", {}) if meta is None else meta
    dist.barrier()  # every rank has read the old manifest before rank 0 rewrites it
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
        for p in [*root.glob("*.tmp-*"), *shard_dir.glob("*.tmp-*")]:  # left by a killed run; removed before any rank writes
            p.unlink()
    dist.barrier()
    done = _scan_shards(shard_dir)
    flat_ids = [i for s in stream for i in s["ids"]]
    digests = _row_digests(stream)
    for e in done:
        past_end = e["first"] + e["rows"] > len(flat_ids)
        if past_end or _jsonable(flat_ids[e["first"] : e["first"] + e["rows"]]) != e["ids"] or (
            "content" in e and _content(digests, e["first"], e["rows"]) != e["content"]
        ):
            raise MismatchError(
                f"store {root} holds examples {e['first']}..{e['first'] + e['rows']} (shard {e.get('file')}) whose ids or "
                "tokens differ from these batches at the same positions (or lie past their end): pass the same batches "
                "to resume, or the old batches followed by new ones to append"
            )
    layers = list(meta_now["layout"])
    dim = max((sl[1] for sl in meta_now["layout"].values()), default=0)
    meta = meta or {}
    if rank == 0:  # a manifest from the start, so that a killed first run can be checked on resume
        atomic_write(root / MANIFEST, json.dumps(_manifest(meta_now, dim, tokens, covariances, meta, _contiguous(done), len(flat_ids))).encode())
    pieces = _pieces(sizes, done)
    if rank == 0 and done:
        log.info("store %s: %d of %d examples already extracted, %d to go", root, len(flat_ids) - sum(p[2] - p[1] for p in pieces), len(flat_ids), sum(p[2] - p[1] for p in pieces))
    runs = _runs_for_rank(pieces, rank, world)
    bar = _progress(sum(p[2] - p[1] for r in runs for p in r), progress and rank == 0)
    for run in runs:
        _extract_run(shard_dir, extractor, stream, sizes, run, tokens, covariances, shard_rows, layers, bar, digests)
    bar.close()
    dist.barrier()
    if rank == 0:
        manifest = _manifest(meta_now, dim, tokens, covariances, meta, _scan_shards(shard_dir), len(flat_ids))
        atomic_write(root / MANIFEST, json.dumps(manifest).encode())
    dist.barrier()
    return FeatureStore.open(root)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", desc="extract", disable=not enabled)


def _extract_run(root, extractor, stream, sizes, run, tokens, covariances, shard_rows, layers, bar, digests) -> None:
    """Extract one run of consecutive pieces and write it as shards of whole batches."""
    b0, first, _ = run[0]
    b_last, _, stop = run[-1]
    start_of = sum(sizes[:b0])
    skip = first - start_of
    if covariances and (skip or stop != sum(sizes[: b_last + 1])):
        raise StoreError(
            f"store {root.parent} ends inside a batch (examples {first}..{stop}): covariance sums are per batch, "
            "so resume with the same batch size as the interrupted run"
        )
    parts: list[Features] = []
    pos = shard_first = first
    for f in extractor.iter_features(stream[b0 : b_last + 1], skip_examples=skip, tokens=tokens, covariances=covariances):
        if pos + len(f) > stop:
            f = slice_rows(f, 0, stop - pos)
        parts.append(f)
        pos += len(f)
        bar.update(len(f))
        if pos - shard_first >= shard_rows or pos == stop:
            _write_shard(root, shard_first, cat_features(parts), layers, _content(digests, shard_first, pos - shard_first))
            parts, shard_first = [], pos
        if pos >= stop:
            break
    if pos != stop:
        raise StoreError(f"the extractor yielded {pos - first} rows for examples {first}..{stop}; expected {stop - first}")
