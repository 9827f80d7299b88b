"""Output paths of the command line and the API, checked before any work and written without loss.

Rules: nothing is written into a feature store (other than by its own writer) or over a
model directory's files; an existing output is refused unless ``--overwrite`` (the API's
``overwrite=True``); a store is written only into a new or empty directory or a store of
ours; the directory must be writable and, for large outputs, hold enough free space;
files are written under a temporary name in the same directory and renamed when whole,
so a failed run leaves the old file intact. ``flag`` names the output as the caller
knows it: ``--matrix`` on the command line, ``matrix_path=`` in the API.

This module imports neither torch nor the store package (the command line's ``--help``
stays light), so the store's own file names are described here as well.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import FastInfluenceError

# Files that make a directory a Hugging Face model, PEFT adapter or tokenizer directory.
MODEL_FILES = (
    "config.json",
    "adapter_config.json",
    "model.safetensors",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


# A store's files and the temporary names its writer gives them while writing: ``.<name>.fi-tmp-<pid>-<hex>``
# (``<name>.tmp-<pid>`` before that). The writer removes leftovers that match these names and no other file.
STORE_MANIFEST = "manifest.json"
STORE_LOCK = ".lock"
STORE_SHARDS = "shards"
SHARD_FILE = re.compile(r"(shard|tokens)-\d+\.safetensors")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutputError(FastInfluenceError):
    """An output path would destroy data or cannot be written."""


def _overwrite_hint(flag: str) -> str:
    return "pass --overwrite" if flag.startswith("--") else "pass overwrite=True"


def store_temporary(path: Path) -> Path:
    """The temporary name a store file is written under before its rename (unique to this write)."""
    return path.with_name(f".{path.name}.fi-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_store_temporary(name: str, final: re.Pattern | str) -> bool:
    """Whether ``name`` is a temporary name of a store file whose final name matches ``final``."""
    final = final.pattern if isinstance(final, re.Pattern) else re.escape(final)
    return re.fullmatch(rf"\.(?:{final})\.fi-tmp-\d+-[0-9a-f]{{8}}|(?:{final})\.tmp-\d+", name) is not None


def _partial_store(path: Path) -> bool:
    """A directory holding only what a store writer leaves before its first manifest (its lock,
    temporary manifests and a ``shards`` directory of shard files): a store of ours, killed early."""
    for p in path.iterdir():
        if p.name == STORE_SHARDS and p.is_dir() and not p.is_symlink():
            if not all(SHARD_FILE.fullmatch(q.name) or is_store_temporary(q.name, SHARD_FILE) for q in p.iterdir()):
                return False
        elif p.name != STORE_LOCK and not is_store_temporary(p.name, STORE_MANIFEST):
            return False
    return True


def disk_full(path: str | os.PathLike, what: str, exc: OSError) -> OSError:
    """The one-line error for a write that ran out of space (``exc`` with ENOSPC or EDQUOT)."""
    reason = "the disk quota is exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
    err = OSError(
        f"cannot write {what} {path}: {reason} (nothing half-written was kept); free space there or choose a "
        "directory on another disk, then run again"
    )
    err.errno = exc.errno
    return err


def store_root(path: Path) -> Path | None:
    """The feature store ``path`` lies in (itself or an ancestor holding a store manifest.json), or None."""
    for d in [path, *path.parents][:4]:
        m = d / "manifest.json"
        if d.is_dir() and m.is_file():
            try:
                head = m.read_text(errors="replace")[:4096]
            except OSError:
                continue
            if "fastinfluence.store" in head:
                return d
    return None


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in MODEL_FILES)


def _writable_parent(path: Path, flag: str) -> None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is a file, not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the directory {parent} is not writable; choose a writable output path")


def check_file(path: str | os.PathLike, flag: str, overwrite: bool, need_bytes: int = 0) -> Path:
    """Check an output file before the work: raises OutputError naming ``flag`` and the fix."""
    path = Path(path)
    store = store_root(path.parent) or (store_root(path) if path.is_dir() else None)
    if store is not None:
        raise OutputError(f"{flag} {path} lies inside the feature store {store}; write outputs outside the store")
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; give a file path")
    if path.exists():
        if path.name in MODEL_FILES or is_model_dir(path.parent) and path.suffix in (".safetensors", ".bin"):
            raise OutputError(f"{flag} {path} is a file of the model directory {path.parent}; write outputs elsewhere")
        if not overwrite:
            raise OutputError(f"{flag} {path} exists; {_overwrite_hint(flag)} to replace it, or choose another path")
    _writable_parent(path, flag)
    if need_bytes:
        check_space(path, flag, need_bytes)
    return path


def check_store_dir(path: str | os.PathLike, flag: str) -> Path:
    """Check the directory a feature store is written into: a new or empty directory, a store of
    ours (to resume or extend), or one its writer left before the first manifest; never a file, a
    model directory, a directory inside a store, or a non-empty directory of other files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a directory for the feature store")
    outer = store_root(path.parent) if path.parent != path else None
    if outer is not None:
        raise OutputError(f"{flag} {path} lies inside the feature store {outer}; give a directory outside it")
    if path.is_dir() and any(path.iterdir()) and store_root(path) != path and not _partial_store(path):
        what = "a model directory" if is_model_dir(path) else "a non-empty directory that is not a feature store"
        raise OutputError(
            f"{flag} {path} is {what}; give a new or empty directory (or an existing store to resume or extend)"
        )
    if is_model_dir(path):
        raise OutputError(f"{flag} {path} is a model directory; give a new directory for the feature store")
    return path


def check_space(path: Path, flag: str, need_bytes: int) -> None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OutputError(
            f"{flag} {path} needs {need_bytes / 2**20:.1f} MiB but {parent} has {free / 2**20:.1f} MiB free; "
            "free space or choose another disk"
        )


def check_dir(path: str | os.PathLike, flag: str, overwrite: bool, protect: tuple[Path, ...] = ()) -> Path:
    """Check an output directory that the command creates (e.g. an unlearned model)."""
    path = Path(path)
    for p in protect:
        if path.exists() and p.exists() and path.resolve() == p.resolve():
            raise OutputError(f"{flag} {path} is the input {p}; write to a new directory")
    store = store_root(path)
    if store is not None:
        raise OutputError(f"{flag} {path} lies inside the feature store {store}; choose a directory outside it")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()):
        if not (path / "unlearn_stats.json").exists():
            raise OutputError(
                f"{flag} {path} is a non-empty directory this command did not write; choose a new directory"
            )
        if not overwrite:
            raise OutputError(
                f"{flag} {path} holds an earlier result; pass --overwrite to replace it, or choose another directory"
            )
    _writable_parent(path / "x", flag) if path.is_dir() else _writable_parent(path, flag)
    return path


def temporary(path: Path) -> Path:
    """A temporary name beside ``path`` (same file system, so the final rename is atomic)."""
    suffix = "".join(path.suffixes[-1:])  # keep .npy: numpy appends it otherwise
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; renamed to ``path`` on success, removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    if path.is_dir() and tmp.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
