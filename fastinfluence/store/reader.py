"""Reading a feature store: :class:`FeatureStore`, a read-only, checked view of a store directory.

Every read checks the shard's file size and header; reading a whole shard (``iter_chunks``)
checks the bytes it reads against their checksum, and ``verify()`` checks them all.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .. import errors
from ..config import ProjectionConfig
from ..features import Chunk, Features
from .format import (
    _ST_DTYPES,
    MANIFEST,
    CorruptShardError,
    StoreError,
    _check_format,
    _read_header,
    check_same_origin,
    contiguous_shards,
    inside,
    layout_from_json,
    read_manifest,
    scan_shards,
    shard_path,
)


class _ShardFile:
    """One safetensors file checked against its manifest entry; tensors are read with pread."""

    def __init__(self, path: Path, size: int, checksums: Mapping[str, str], check_size: bool = True):
        self.path = path
        self.checksums = checksums
        actual = path.stat().st_size if path.exists() else -1
        if check_size and actual != size:
            state = "missing" if actual < 0 else f"{actual} bytes, the manifest says {size}"
            raise CorruptShardError(
                f"shard {path} is {state}: it is truncated or was replaced; restore it or re-extract the store"
            )
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
            raise CorruptShardError(
                f"shard {self.path}: tensor {name!r} does not match its checksum; the file is corrupted"
            )
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
        try:
            self.config = ProjectionConfig.from_dict(manifest["config"])
            self.fingerprint = manifest["fingerprint"]
            self.layout = layout_from_json(manifest["layout"])
            self.dtype = getattr(torch, str(manifest["dtype"]), None)
            if not isinstance(self.dtype, torch.dtype):
                raise ValueError(f"dtype {manifest['dtype']!r} is not a torch dtype")
            self.dim = int(manifest["dim"])
            if self.dim != max((sl.stop for sl in self.layout.values()), default=0):
                raise ValueError(f"dim {self.dim} does not match the layout")
            self.shards = manifest["shards"]
            for i, entry in enumerate(self.shards):
                _check_entry(path, i, entry)
            self.has_tokens = bool(manifest["tokens"])
            self.has_covariances = bool(manifest["covariances"])
            self.meta = manifest.get("meta", {})
            self.complete = bool(manifest.get("complete", True))  # False while (or after a killed) extraction runs
            self.expected_rows = int(manifest.get("expected_rows", manifest.get("num_rows", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"lacks {exc}" if isinstance(exc, KeyError) else f"is malformed ({exc})"
            raise StoreError(
                f"{path / MANIFEST} {what}: the manifest is damaged or was not written by fastinfluence; re-extract "
                "the store or restore its manifest"
            ) from None
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
    def open(cls, path: str | os.PathLike, expect: Mapping | None = None) -> FeatureStore:
        """Open the store at ``path`` read-only.

        The manifest's shard entries are checked against the shard files' headers (rows, shapes,
        dtypes; a missing or truncated file is reported when read, or by ``verify()``), and every
        shard file must lie in the store's directory (no ``../`` names, no links out of it).

        ``expect``: what the store must match: a ``GradientExtractor``, ``Features`` or another
        store (anything with ``metadata()``), or such a metadata dict; a store made with a
        different model, layer set or config is refused.
        """
        path = Path(path)
        if expect is not None and not isinstance(expect, Mapping):
            if not callable(getattr(expect, "metadata", None)):
                raise TypeError(
                    f"FeatureStore.open: expect must be a GradientExtractor, Features, a FeatureStore or their "
                    f"metadata() dict, got {type(expect).__name__}"
                )
            expect = expect.metadata()
        manifest = read_manifest(path)
        _check_format(path, manifest)
        if not manifest.get("complete", True) and (path / "shards").is_dir():
            # A killed (or running) extraction wrote the manifest before its shards: the committed
            # shards on disk are what it has, and what a resume keeps.
            written = contiguous_shards(scan_shards(path / "shards"))
            rows = sum(s["rows"] for s in written)
            if rows > sum(s["rows"] for s in manifest["shards"]):
                # killed after its last shard, before the manifest: complete, as close() would say
                done = rows == int(manifest.get("expected_rows", -1))
                manifest = dict(manifest, shards=written, num_rows=rows, complete=done)
        store = cls(path, manifest)
        for i, entry in enumerate(store.shards):
            for kind in ("shard", "tokens") if entry.get("tokens") else ("shard",):
                if store._file(i, kind).exists():
                    store._check_header(i, store._shard(i, kind, check_size=False), kind)
        if expect is not None:
            check_same_origin(store.metadata(), expect, f"store {path}", "the given extractor/features")
        return store

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, rows={self.num_rows}, dim={self.dim}, "
            f"dtype={self.manifest['dtype']}, shards={len(self.shards)})"
        )

    def metadata(self) -> dict:
        return {k: self.manifest[k] for k in ("config", "fingerprint", "layout", "dtype")}

    def row_bounds(self) -> list[int]:
        """Rows at which the rows may be split between processes: shard boundaries (shards are read whole)."""
        return [s["first"] for s in self.shards] + [self.num_rows]

    def _file(self, i: int, kind: str = "shard") -> Path:
        s = self.shards[i]
        if kind == "tokens":
            return shard_path(self.path, s["tokens"]["file"], f"the manifest's shards[{i}].tokens.file")
        return shard_path(self.path, s["file"], f"the manifest's shards[{i}].file")

    def _shard(self, i: int, kind: str = "shard", check_size: bool = True) -> _ShardFile:
        """Shard ``i``'s feature file (``kind="shard"``) or token file, its size and header checked."""
        s = self.shards[i]
        e = s["tokens"] if kind == "tokens" else s
        shard = _ShardFile(self._file(i, kind), e["bytes"], e["sha256"], check_size)
        if check_size:
            self._check_header(i, shard, kind)
        return shard

    def _check_header(self, i: int, shard: _ShardFile, kind: str) -> None:
        """The shard file's header holds the rows, shapes and dtypes its manifest entry says."""
        s, rows = self.shards[i], self.shards[i]["rows"]
        if kind == "tokens":
            want = {"offsets": ([rows + 1], torch.int64)}
        else:
            want = {"features": ([rows, self.dim], self.dtype), "norms": ([rows], torch.float32)}
        for name, (shape, dtype) in want.items():
            h = shard.header.get(name)
            got = (h.get("shape"), _ST_DTYPES.get(h.get("dtype"))) if isinstance(h, dict) else (None, None)
            if got != (shape, dtype):
                raise CorruptShardError(
                    f"store {self.path}: shard {shard.path.name} holds {name} of shape {got[0]} ({got[1]}) where its "
                    f"manifest entry says {shape} ({dtype}, {rows} rows); the manifest or the shard was altered: "
                    "restore both or re-extract the store"
                )
        if kind == "shard":
            try:
                entry = json.loads(shard.header["__metadata__"]["entry"])
                same = [entry["first"], entry["rows"], entry["ids"]] == [s["first"], rows, s["ids"]]
            except (KeyError, TypeError, ValueError):
                same = False
            if not same:
                raise CorruptShardError(
                    f"store {self.path}: shard {shard.path.name}'s header records other examples (first, rows, ids) "
                    "than its manifest entry; the manifest or the shard was altered: restore both or re-extract the "
                    "store"
                )

    def _locate(self, row: int) -> int:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is outside the store's {self.num_rows} rows")
        return bisect.bisect_right(self._starts, row) - 1

    @property
    def norms(self) -> torch.Tensor:
        """(N,) float32 L2 norms of all rows (read once, checked)."""
        if self._norms is None:
            self._norms = (
                torch.cat([self._shard(i).tensor("norms") for i in range(len(self.shards))])
                if self.shards
                else torch.empty(0)
            )
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
                plan.append(
                    (
                        i,
                        a - s["first"],
                        min(a + rows, hi) - s["first"],
                        lo == s["first"] and hi == s["first"] + s["rows"],
                    )
                )
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
                raise CorruptShardError(
                    f"shard {shard.path}: features do not match their checksum; the file is corrupted (run "
                    f"FeatureStore.verify())"
                )
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
        """Per-token factors of one example: ({layer: A~ (T, k_in)}, {layer: G~ (T, k_out)}); a routed
        layer (an MoE expert) has its own rows (n, k_in), (n, k_out), at the tokens ``token_positions(row)`` gives."""
        shard, spans = self._token_spans(row)
        return (
            {n: shard.tensor(f"a.{n}", spans[n]) for n in self.layout},
            {n: shard.tensor(f"g.{n}", spans[n]) for n in self.layout},
        )

    def token_positions(self, row: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(T, {routed layer: (n,) int64 token position in 0 .. T - 1 of each of its ``token_factors`` rows})
        of one example, T its number of tokens (no routed layer: an empty dict)."""
        shard, spans = self._token_spans(row)
        routed = {n: shard.tensor(f"p.{n}", spans[n]) for n in self.layout if f"p.{n}" in shard.header}
        return spans[None].stop - spans[None].start, routed

    def _token_spans(self, row: int) -> tuple[_ShardFile, dict[str | None, slice]]:
        """The token file of ``row``'s shard and the span of ``row``'s rows of each layer (None: its tokens)."""
        if not self.has_tokens:
            raise StoreError(
                f"store {self.path} has no per-token factors: extract with {errors.name('tokens', True)} to get "
                f"per-token scores"
            )
        i = self._locate(row)
        shard = self._shard(i, "tokens")
        a = row - self.shards[i]["first"]
        offsets = shard.tensor("offsets")[a : a + 2]
        spans: dict[str | None, slice] = {None: slice(int(offsets[0]), int(offsets[1]))}
        for n in self.layout:
            o = shard.tensor(f"o.{n}", slice(a, a + 2)) if f"o.{n}" in shard.header else offsets
            spans[n] = slice(int(o[0]), int(o[1]))
        return shard, spans

    @property
    def stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]] | None:
        """Per layer (sum a~a~^T (k_in, k_in), sum g~g~^T (k_out, k_out), token count), float64, over all
        shards (read on each access); None when the store was extracted without covariances."""
        if not self.has_covariances:
            return None
        total: dict[str, list] = {}
        for i in range(len(self.shards)):
            shard = self._shard(i)
            for n in self.layout:
                A, G, c = (shard.tensor(f"stats.{n}.{p}") for p in ("a", "g", "count"))
                t = total.setdefault(n, [0, 0, 0])
                t[0], t[1], t[2] = t[0] + A, t[1] + G, t[2] + int(c[0])
        return {n: (a, g, c) for n, (a, g, c) in total.items()}

    def read_cache(self, group: str, name: str, expect: Mapping[str, str]) -> dict[str, torch.Tensor] | None:
        """Tensors of the cache ``<group>/<name>`` (written by ``store.write_cache``) when its
        metadata holds every item of ``expect``; None when it is absent or stale."""
        path = self.path / group / f"{name}.safetensors"
        if not path.exists():
            return None
        if not inside(self.path, path):
            raise StoreError(
                f"store {self.path}: the cache {path} links to {path.resolve()}, outside the store; delete the link "
                "(the cache is rebuilt)"
            )
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if any(meta.get(k) != v for k, v in expect.items()):
            return None
        return load_file(str(path))

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
        return {
            "rows": self.num_rows,
            "shards": len(self.shards),
            "files": files,
            "bytes": size,
            "complete": self.complete,
        }

    def to_features(self) -> Features:
        """The whole store in memory (for small stores: queries)."""
        data = (
            torch.cat([c.data for c in self.iter_chunks(1 << 16)])
            if self.num_rows
            else torch.empty(0, self.dim, dtype=self.dtype)
        )
        return Features(data, self.norms.clone(), list(self.ids), self.layout, self.config, self.fingerprint)


def _check_entry(path: Path, i: int, entry: Any) -> None:
    """A manifest shard entry has the fields and types the reader uses, and names files inside the store."""
    if not isinstance(entry, dict):
        raise TypeError(f"shards[{i}] is {type(entry).__name__}, not an object")
    for key, kind in (("first", int), ("rows", int), ("bytes", int), ("sha256", dict), ("ids", list)):
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            raise TypeError(f"shards[{i}].{key} is {entry.get(key)!r}, not {kind.__name__}")
    if entry["rows"] < 0 or len(entry["ids"]) != entry["rows"]:
        raise ValueError(f"shards[{i}] lists {len(entry['ids'])} ids for {entry['rows']} rows")
    shard_path(path, entry.get("file"), f"the manifest's shards[{i}].file")
    tokens = entry.get("tokens")
    if tokens is not None:
        if not isinstance(tokens, dict) or not isinstance(tokens.get("bytes"), int):
            raise TypeError(f"shards[{i}].tokens is {tokens!r}, not a file entry")
        shard_path(path, tokens.get("file"), f"the manifest's shards[{i}].tokens.file")
