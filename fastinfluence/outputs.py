"""Output paths of the command line, checked before any work and written without loss.

Rules: no command writes into a feature store or over a model directory's files; an
existing output is refused unless ``--overwrite``; the directory must be writable and,
for large outputs, hold enough free space; files are written under a temporary name in
the same directory and renamed when whole, so a failed run leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

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


class OutputError(ValueError):
    """An output path would destroy data or cannot be written."""


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
            raise OutputError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another path")
    _writable_parent(path, flag)
    if need_bytes:
        check_space(path, flag, need_bytes)
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
