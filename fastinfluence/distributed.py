"""Thin helpers over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Every helper is a no-op for a single process (no process group initialised), so the same
extraction and scoring code runs alone or under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return (tdist.get_rank(), tdist.get_world_size()) if is_distributed() else (0, 1)


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1).

    Uses NCCL when CUDA is available, gloo otherwise; each rank takes GPU ``LOCAL_RANK``.
    Returns whether this process is part of a multi-process run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend)
    return True


def resolve_device(choice: str | None) -> str:
    """A ``--device`` value checked before any work: ``auto`` (or None) is this rank's GPU when
    there is one, else cpu; a device that is not one, or a CUDA device that is absent, is a
    ValueError naming the fix."""
    if choice is None or choice == "auto":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", choice):
        raise ValueError(f"--device {choice!r} is not a device; use auto, cpu, cuda or cuda:N")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {choice}: CUDA is not available on this machine; use --device cpu")
        n, index = torch.cuda.device_count(), int(choice.split(":")[1]) if ":" in choice else 0
        if index >= n:
            raise ValueError(f"--device {choice}: this machine has {n} CUDA device(s); use cuda:0 to cuda:{n - 1}")
    return choice


def default_device() -> torch.device:
    """This rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def comm_device() -> torch.device:
    """The device collectives run on: the current GPU for NCCL, the CPU for gloo."""
    if is_distributed() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank. A rank that captures on a sharded model first idles in step with the
    peers still capturing (``Lockstep``): their forwards need its all-gathers."""
    if is_distributed():
        finish_current()
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks (returned on t's device)."""
    if not is_distributed():
        return t
    buf = t.to(comm_device()).contiguous()
    tdist.all_reduce(buf)
    return buf.to(t.device)


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenation over the ranks (in rank order) of equally shaped tensors."""
    if not is_distributed():
        return t
    buf = t.to(comm_device()).contiguous()
    out = [torch.empty_like(buf) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, buf)
    return torch.cat(out, dim=dim).to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``obj`` of every rank, in rank order (a one-element list outside ``torch.distributed``)."""
    if not is_distributed():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


class Lockstep:
    """Pairs the forward passes of the ranks of a sharded model (``fastinfluence.sharding``).

    Every forward of an FSDP2-sharded model is a collective, so ranks holding different numbers
    of batches must still run the same number of steps. Before each step a rank all-reduces a
    one-hot flag of its kind (``step``); a rank out of batches all-reduces zeros (``finish``)
    and, while a peer flags a step, runs an idle one of that kind; all leave ``finish`` at the
    all-reduce where no rank flags a step. ``idle(kind)`` runs one step of ``kind`` (one of
    ``KINDS``: a capture forward + backward, or a forward alone) on a dummy batch, with the same
    collectives as a real one. The newest ``Lockstep`` of a process is the one ``distributed.barrier`` finishes.
    """

    KINDS = ("backward", "forward")
    current: Lockstep | None = None

    def __init__(self, idle: Callable[[str], None]):
        self.idle = idle
        Lockstep.current = self

    def step(self, kind: str) -> None:
        """Before each of this rank's steps: tell the peers that one of ``kind`` is coming."""
        Lockstep.current = self
        flags = torch.zeros(len(self.KINDS))
        flags[self.KINDS.index(kind)] = 1
        all_reduce_sum(flags)

    def finish(self) -> None:
        """This rank has no step left: idle for every step a peer still takes, until all are done."""
        while True:
            flags = all_reduce_sum(torch.zeros(len(self.KINDS)))
            if not bool(flags.any()):
                return
            self.idle(self.KINDS[int(flags.argmax())])


def finish_current() -> None:
    """The newest ``Lockstep``'s ``finish`` (``distributed.barrier`` runs it); nothing when none exists."""
    if Lockstep.current is not None:
        Lockstep.current.finish()
