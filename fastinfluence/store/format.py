"""The store's on-disk format: manifest fields, metadata checks, atomic checksummed files.

Layout of a store directory::

    manifest.json                      format version, config, fingerprint, layout, dtype, shards
    shards/shard-<first>.safetensors   features (n, D), norms (n,) float32, covariance sums
    shards/tokens-<first>.safetensors  per-token factors of the same rows (optional): offsets,
                                       a.<layer>, g.<layer>; an MoE expert's layer adds
                                       o.<layer> (its rows' offsets), p.<layer> (their tokens)
    <group>/<name>.safetensors         caches derived from the rows, e.g. ``precondition/kfac``

``<first>`` is the position of the shard's first example in the extraction stream, so
shard names are unique across ranks and runs. Every file is written to a temporary file,
flushed, fsynced and renamed (:func:`atomic_write`): a file that exists is whole, and a
shard file is the record that its rows are done (its safetensors header repeats its
manifest entry). Checksums are SHA-256 per tensor, kept in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from .. import errors
from ..config import ProjectionConfig
from ..errors import FastInfluenceError
from ..features import Features, LayerSlice
from ..outputs import NO_SPACE, SHARD_FILE, STORE_SHARDS, disk_full, store_temporary

FORMAT = "fastinfluence.store"
VERSION = 1
MANIFEST = "manifest.json"

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
}


_EXTRACT_STORE = "GradientExtractor.extract(batches, store=...)"  # how a store is made (errors.name)


class StoreError(FastInfluenceError, RuntimeError):
    """A feature store is missing, incomplete or unusable."""


class CorruptShardError(StoreError):
    """A shard's bytes do not match its manifest entry (truncated or corrupted)."""


class MismatchError(FastInfluenceError):
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
    return normalize_metadata(f.metadata())


def _first_difference(a: Any, b: Any, path: str, names: tuple[str, str]) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                where, value = (names[0], a[key]) if key in a else (names[1], b[key])
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
                return f"{path}[{key!r}] is {shown} in {where} and absent (the default) in the other"
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
            what = {
                "fingerprint": "model",
                "layout": "layer set",
                "config": "projection config",
                "dtype": "storage dtype",
            }[key]
            if key == "fingerprint" and diff.startswith("fingerprint['normalizer']"):
                what = "gradient normalizer (GradientExtractor(normalizer=...))"
            raise MismatchError(
                f"{first_name} and {second_name} were made with a different {what}: {diff}; "
                f"extract both with the same {errors.name('model')}, {errors.name('layers')} and "
                f"{errors.name('ProjectionConfig')}"
            )


# ----------------------------------------------------------------------------- file I/O


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename: readers see the old file or the whole new one.

    The temporary name is unique to this write (``outputs.store_temporary``) and removed when the
    write fails; a full disk raises one OSError naming ``path`` and the fix."""
    tmp = store_temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise disk_full(path, "the file", exc) from None
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inside(root: Path, path: Path) -> bool:
    """Whether ``path``, its links followed, lies in the directory ``root`` (its links followed)."""
    return path.resolve().is_relative_to(root.resolve())


def shard_path(root: Path, name: Any, where: str) -> Path:
    """``<root>/shards/<name>`` for a shard file named in the manifest (entry ``where``); a name that
    is not a plain shard file name, or a file (or ``shards`` directory) that links out of the store,
    is refused: a manifest is data, never a path to follow."""
    if not isinstance(name, str) or not SHARD_FILE.fullmatch(name):
        raise StoreError(
            f"store {root}: {where} is {name!r}, not a shard file name (shard-<n>.safetensors or "
            "tokens-<n>.safetensors in its shards directory); the manifest was edited or crafted: re-extract the store"
        )
    path = root / STORE_SHARDS / name
    if not inside(root, path):
        raise StoreError(
            f"store {root}: {path} ({where}) links to {path.resolve()}, outside the store; a store's files must "
            "lie in its directory: replace the link with the file or re-extract the store"
        )
    return path


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
        raise CorruptShardError(
            f"shard {path} has an unreadable header ({exc}): the file is truncated or corrupted"
        ) from exc


def scan_shards(root: Path) -> list[dict]:
    """Entries of every committed shard file (read from their headers), in stream order."""
    entries = []
    for p in sorted(q for q in root.glob("shard-*.safetensors") if SHARD_FILE.fullmatch(q.name)):
        shard_path(root.parent, p.name, f"the shard file {p.name}")
        header, start = _read_header(p)
        try:
            entry = json.loads(header["__metadata__"]["entry"])
        except (KeyError, TypeError, ValueError):
            raise CorruptShardError(
                f"shard {p} has no readable entry in its header: it is not a fastinfluence shard or is damaged; "
                "delete it and re-run the extraction to rewrite it"
            ) from None
        size, end = (
            p.stat().st_size,
            start + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0),
        )
        if size != end:
            raise CorruptShardError(
                f"shard {p} holds {size} bytes where its header needs {end}: the file is truncated or damaged; "
                "delete it and re-run the extraction to rewrite it"
            )
        entry.update(file=p.name, bytes=size)
        entries.append(entry)
    entries.sort(key=lambda e: e["first"])
    for a, b in zip(entries, entries[1:]):
        if a["first"] + a["rows"] > b["first"]:
            raise StoreError(
                f"shards {a['file']} and {b['file']} overlap in {root}: the store was written by two different runs"
            )
    return entries


def contiguous_shards(entries: list[dict]) -> list[dict]:
    """The shards that cover examples 0..n without a gap (what a reader may use)."""
    out, expected = [], 0
    for e in entries:
        if e["first"] != expected:
            break
        out.append(e)
        expected += e["rows"]
    return out


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


def read_manifest(path: Path) -> dict:
    """The manifest of the store at ``path``; StoreError naming the file when it is absent or not JSON."""
    if path.is_file():
        raise StoreError(f"{path} is a file, not a feature store directory; give the directory that holds {MANIFEST}")
    if not path.exists():
        raise StoreError(
            f"no feature store at {path}: no such directory (extract one with {errors.name(_EXTRACT_STORE)})"
        )
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StoreError(
            f"no feature store at {path}: {MANIFEST} is missing (extract one with {errors.name(_EXTRACT_STORE)})"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(
            f"{path / MANIFEST} is not valid JSON ({exc}): the manifest is damaged; re-run the extraction into "
            f"{path} to rewrite it"
        ) from None


def _manifest(
    meta: dict,
    dim: int,
    tokens: bool,
    covariances: bool,
    user_meta: dict,
    shards: list[dict],
    expected: int | None = None,
) -> dict:
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


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` and string ``metadata`` as one safetensors file, atomically."""
    data = safetensors_save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata))
    atomic_write(Path(path), data)
