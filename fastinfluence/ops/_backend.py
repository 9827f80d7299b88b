"""Backend registry for the fused ops.

Every op in ``fastinfluence.ops`` has a plain-torch reference, registered with the op's
dispatch name by its module (``register_op``). Faster implementations live in backends:
modules or objects registered by name (``register_backend``) that expose functions with the
op's name and signature:

=========  =====================================  ======================================
name       implementation                         devices
=========  =====================================  ======================================
torch      ``fastinfluence.ops.<op>`` (reference)  any
triton     ``fastinfluence.triton_kernels``        CUDA (CPU only under TRITON_INTERPRET=1)
cuda       ``fastinfluence.ops.backends.cuda``     CUDA
cpu        ``fastinfluence.ops.backends.cpu``      CPU (C++/OpenMP host twins of the CUDA kernels)
=========  =====================================  ======================================

A backend defines ``is_available(device) -> (bool, why_not)`` (optional: always available
without it), one function per op it implements, and optionally ``supports_<op>(**args)``
returning True or a string saying why these arguments are not covered (float64, a rank
above the kernel's tile, ...). The registry owns fallback, in ``dispatch`` alone: an op
the backend lacks, or arguments it does not support, run on the torch reference.

Selection: ``set_backend(name)``, ``with use_backend(name):`` or the environment variable
``FASTINFLUENCE_BACKEND``. A backend asked for by name that cannot load or run on the
inputs' device raises an error saying why. ``auto`` (the default) tries, per op and device,
the backends registered for that device type in registration order and falls back to
torch quietly. ``trace()`` records which backend ran each dispatched op.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run here."""


@dataclass
class _Backend:
    name: str
    target: Any  # a module path imported on first use, or the module / object itself
    auto: tuple[str, ...]  # device types on which ``auto`` tries it


class Dispatch(NamedTuple):
    """One dispatched op: the backend that ran it, and why the selected one did not (or None)."""

    op: str
    backend: str
    fallback: str | None


_ops: dict[str, Callable] = {}  # dispatch name -> torch reference
_backends: dict[str, _Backend] = {}  # in registration order (auto's preference)
_loaded: dict[str, Any] = {}  # name -> loaded module / object, or the Exception that stopped it
_selected: str | None = None
_traces: list[list[Dispatch]] = []


def register_op(name: str, reference: Callable) -> Callable:
    """Declare op ``name`` with its torch ``reference`` (done by each op module); returns the reference."""
    _ops[name] = reference
    return reference


def registered_ops() -> list[str]:
    """Dispatch names of every op, in registration order."""
    return list(_ops)


def register_backend(name: str, backend: Any, *, auto: Sequence[str] = (), replace: bool = False) -> None:
    """Register ``backend`` (a module, an object, or a module path imported on first use) as ``name``.

    Args:
        auto: device types (``"cuda"``, ``"cpu"``) on which ``auto`` tries this backend, after
            the ones registered before it.
        replace: allow re-registering an existing name.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("torch", "auto"):
        raise ValueError(f"backend name must be a lower-case identifier other than 'torch' and 'auto', got {name!r}")
    if name in _backends and not replace:
        raise ValueError(f"a fastinfluence backend named {name!r} is registered already; pass replace=True")
    _backends[name] = _Backend(name, backend, tuple(auto))
    _loaded.pop(name, None)


def unregister_backend(name: str) -> None:
    """Remove a registered backend (a selection of it falls back to ``auto``)."""
    global _selected
    _backends.pop(name)
    _loaded.pop(name, None)
    if _selected == name:
        _selected = None


def backend_names() -> list[str]:
    """Every name ``set_backend`` accepts: ``torch``, the registered backends, ``auto``."""
    return ["torch", *_backends, "auto"]


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in backend_names():
        raise ValueError(
            f"unknown fastinfluence backend {name!r}; choose one of {', '.join(backend_names())} "
            "(set with fastinfluence.ops.set_backend or FASTINFLUENCE_BACKEND)"
        )
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op: ``torch``, a registered backend (``triton``, ``cuda``, ``cpu``) or ``auto``.

    Overrides ``FASTINFLUENCE_BACKEND``. Named backends are checked when an op runs,
    because availability depends on the device of the inputs.
    """
    global _selected
    _selected = _validate(name)


def get_backend() -> str:
    """The selected backend name (``set_backend`` first, then the environment, then ``auto``)."""
    if _selected is not None:
        return _selected
    return _validate(os.environ.get("FASTINFLUENCE_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select ``name`` inside the block and restore the previous selection after it."""
    global _selected
    previous, _selected = _selected, _validate(name)
    try:
        yield
    finally:
        _selected = previous


@contextlib.contextmanager
def trace() -> Iterator[list[Dispatch]]:
    """Collect a ``Dispatch`` for every op dispatched inside the block."""
    events: list[Dispatch] = []
    _traces.append(events)
    try:
        yield events
    finally:
        _traces.remove(events)


def _module(name: str) -> Any:
    if name not in _loaded:
        target = _backends[name].target
        try:
            _loaded[name] = importlib.import_module(target) if isinstance(target, str) else target
        except Exception as exc:  # an optional dependency (triton, compiled parts) is missing
            _loaded[name] = exc
    mod = _loaded[name]
    if isinstance(mod, Exception):
        raise BackendUnavailableError(
            f"fastinfluence backend {name!r} could not be loaded: {mod}. "
            "Install its dependency or use set_backend('torch') / 'auto'."
        )
    return mod


def _availability(name: str, device: torch.device) -> tuple[Any, str]:
    try:
        mod = _module(name)
    except BackendUnavailableError as exc:
        return None, str(exc)
    is_available = getattr(mod, "is_available", None)
    ok, why = is_available(device) if is_available is not None else (True, "")
    return (mod, "") if ok else (None, why)


def _covers(mod: Any, name: str, op: str, args: dict) -> Callable | str:
    """The backend's function for ``op`` when it covers ``args``, else why not."""
    fn = getattr(mod, op, None)
    if fn is None:
        return f"backend {name!r} does not implement {op}"
    supports = getattr(mod, f"supports_{op}", None)
    verdict = True if supports is None else supports(**args)
    return fn if verdict is True else f"backend {name!r} does not cover these inputs: {verdict}"


def resolve(op: str, device: torch.device | str, args: dict) -> tuple[Callable, str, str | None]:
    """(implementation, backend name, why the selected backend is not used or None) for ``op`` on ``args``."""
    device = torch.device(device)
    reference = _ops[op]
    name = get_backend()
    if name == "torch":
        return reference, "torch", None
    if name == "auto":
        reasons = []
        for candidate in (b.name for b in _backends.values() if device.type in b.auto):
            mod, why = _availability(candidate, device)
            fn = _covers(mod, candidate, op, args) if mod is not None else why
            if callable(fn):
                return fn, candidate, None
            reasons.append(fn)
        return reference, "torch", "; ".join(reasons) or None
    mod, why = _availability(name, device)
    if mod is None:
        raise BackendUnavailableError(
            f"op {op!r}: backend {name!r} cannot run on device {device}: {why}. "
            "Use set_backend('auto') to fall back to torch."
        )
    fn = _covers(mod, name, op, args)
    return (fn, name, None) if callable(fn) else (reference, "torch", fn)


def dispatch(op: str, device: torch.device | str, **args: Any) -> Any:
    """Run ``op`` on ``args`` (keyword arguments named as in the reference) with the selected backend."""
    fn, backend, fallback = resolve(op, device, args)
    if fallback is not None and get_backend() != "auto":
        log.debug("%s runs on torch: %s", op, fallback)
    for events in _traces:
        events.append(Dispatch(op, backend, fallback))
    return fn(**args)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` (``torch`` always)."""
    device = torch.device(device)
    return ["torch"] + [n for n in _backends if _availability(n, device)[0] is not None]


def implements(backend: str, op: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run here and has its own implementation of ``op`` (torch always does)."""
    if backend == "torch":
        return True
    mod, _ = _availability(_validate(backend), torch.device(device))
    return mod is not None and getattr(mod, op, None) is not None


register_backend("triton", "fastinfluence.triton_kernels", auto=("cuda",))
register_backend("cuda", "fastinfluence.ops.backends.cuda", auto=("cuda",))
register_backend("cpu", "fastinfluence.ops.backends.cpu", auto=("cpu",))
