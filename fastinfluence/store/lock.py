"""One writer per feature store: a lock file keyed to the writing run.

Rank 0 of a run creates ``<store>/.lock`` (exclusively) holding a run id it broadcasts to
the other ranks, which join by checking that the file holds that id. A second,
independent writer finds a lock of another run and is refused with its pid, host and
start time. A lock left by a killed process on this host (its pid is gone) is stale and
taken over; a lock from another host is removed by hand. The lock is released when the
write ends, by success or error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .. import distributed as dist
from ..outputs import OutputError, check_store_dir
from .format import StoreError

LOCK = ".lock"
log = logging.getLogger(__name__)


class StoreLockedError(StoreError):
    """Another run is writing the store."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _take(root: Path, run: str) -> str | None:
    """Create the lock for ``run``; returns an error message when another live run holds it."""
    path = root / LOCK
    mine = {"run": run, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = _read(path)
            if held is None:  # being written this instant, or garbage: look again
                time.sleep(0.05)
                held = _read(path)
            if held is not None and held.get("run") == run:
                return None
            if held is not None and (held.get("host") != mine["host"] or _alive(int(held.get("pid", -1)))):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
                return (
                    f"store {root} is being written by another run (pid {held.get('pid')} on {held.get('host')}, "
                    f"since {since}); wait for it to finish, or delete {path} if that run is dead"
                )
            log.warning("store %s: taking over the lock of a run that is gone (%s)", root, held)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return None
    return f"store {root}: could not take the lock {path}; delete it if no run is writing the store"


@contextlib.contextmanager
def writing(root: str | os.PathLike) -> Iterator[None]:
    """Hold the store's lock for this run (every rank of a ``torch.distributed`` run enters).

    Rank 0 first checks that ``root`` may hold a store (``outputs.check_store_dir``: a new or empty
    directory or a store of ours; OutputError otherwise) and that its files are not links out of it
    (StoreError), before it creates anything there."""
    from .writer import check_layout

    root = Path(root)
    rank, _ = dist.rank_world()
    run = dist.broadcast_object(uuid.uuid4().hex if rank == 0 else None)
    error = None
    if rank == 0:
        try:
            check_store_dir(root, "store")
            check_layout(root)
            root.mkdir(parents=True, exist_ok=True)
            error = _take(root, run)
            error = None if error is None else ("locked", error)
        except (OutputError, StoreError) as exc:
            error = ("output" if isinstance(exc, OutputError) else "store", str(exc))
        except OSError as exc:
            error = ("locked", f"store {root}: cannot create it ({exc.strerror}); choose a writable directory")
    error = dist.broadcast_object(error)
    if error is None and rank != 0 and (_read(root / LOCK) or {}).get("run") != run:
        error = ("locked", f"store {root} is locked by another run than this one's rank 0; start one writer per store")
    if error is not None:
        kind, message = error
        raise {"output": OutputError, "store": StoreError, "locked": StoreLockedError}[kind](message)
    try:
        yield
    finally:
        if rank == 0 and (_read(root / LOCK) or {}).get("run") == run:
            (root / LOCK).unlink(missing_ok=True)
