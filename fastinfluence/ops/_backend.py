"""Backend registry for the fused ops.

Every op in ``fastinfluence.ops`` has a plain-torch reference. Faster implementations
live in backend modules that expose functions with the op's name and signature:

=========  =====================================  ======================================
name       module                                 devices
=========  =====================================  ======================================
torch      ``fastinfluence.ops.<op>`` (reference)  any
triton     ``fastinfluence.triton_kernels``        CUDA (CPU only under TRITON_INTERPRET=1)
cuda       ``fastinfluence.ops.backends.cuda``     CUDA
cpu        ``fastinfluence.ops.backends.cpu``      CPU (C++/OpenMP host twins of the CUDA kernels)
=========  =====================================  ======================================

A backend module defines ``is_available(device: torch.device) -> tuple[bool, str]``
(the string says why not) and one function per op it implements.

Selection: ``set_backend(name)`` or the environment variable ``FASTINFLUENCE_BACKEND``.
A backend asked for by name that cannot run raises an error saying why; an op that the
named backend does not implement runs on torch. ``auto`` (the default) picks, per op and
device, the first available backend in ``AUTO_ORDER`` and falls back to torch quietly.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu", "auto")

_MODULES = {
    "triton": "fastinfluence.triton_kernels",
    "cuda": "fastinfluence.ops.backends.cuda",
    "cpu": "fastinfluence.ops.backends.cpu",
}

# Preference of ``auto`` per device type. Ops a backend does not implement are skipped,
# so a backend only needs to list what it is fastest at by implementing it.
AUTO_ORDER = {
    "cuda": ("triton", "cuda"),
    "cpu": ("cpu",),
}

_selected: str | None = None
_loaded: dict[str, ModuleType | Exception] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run here."""


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(
            f"unknown fastinfluence backend {name!r}; choose one of {', '.join(BACKENDS)} "
            "(set with fastinfluence.ops.set_backend or FASTINFLUENCE_BACKEND)"
        )
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op: ``torch``, ``triton``, ``cuda``, ``cpu`` or ``auto``.

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


def _module(name: str) -> ModuleType:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # an optional dependency (triton, compiled parts) is missing
            _loaded[name] = exc
    mod = _loaded[name]
    if isinstance(mod, Exception):
        raise BackendUnavailableError(
            f"fastinfluence backend {name!r} could not be loaded: {mod}. "
            "Install its dependency or use set_backend('torch') / 'auto'."
        )
    return mod


def _availability(name: str, device: torch.device) -> tuple[ModuleType | None, str]:
    try:
        mod = _module(name)
    except BackendUnavailableError as exc:
        return None, str(exc)
    ok, why = mod.is_available(device)
    return (mod, "") if ok else (None, why)


def resolve(op: str, reference: Callable, device: torch.device | str) -> Callable:
    """The implementation of ``op`` for inputs on ``device`` under the selected backend."""
    device = torch.device(device)
    name = get_backend()
    if name == "torch":
        return reference
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ()):
            mod, _ = _availability(candidate, device)
            fn = getattr(mod, op, None) if mod is not None else None
            if fn is not None:
                return fn
        return reference
    mod, why = _availability(name, device)
    if mod is None:
        raise BackendUnavailableError(
            f"op {op!r}: backend {name!r} cannot run on device {device}: {why}. "
            "Use set_backend('auto') to fall back to torch."
        )
    return getattr(mod, op, None) or reference


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` (``torch`` always)."""
    device = torch.device(device)
    return ["torch"] + [n for n in _MODULES if _availability(n, device)[0] is not None]


def implements(backend: str, op: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run here and has its own implementation of ``op`` (torch always does)."""
    if backend == "torch":
        return True
    mod, _ = _availability(_validate(backend), torch.device(device))
    return mod is not None and getattr(mod, op, None) is not None
