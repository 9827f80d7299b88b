"""What the library raises for an input that cannot work, and how its messages name parameters.

Every such error is a ``FastInfluenceError`` (a ``ValueError``, so ``except ValueError``
keeps working): one line that names the parameter at fault and the fix. The command line
prints ``str(error)`` of any of them on one line with exit code 2.

A message names a parameter through ``name("allow_incomplete", True)``: in Python that is
``allow_incomplete=True``; while the command line runs (``spelled_as``), the same call gives
the flag that sets the parameter (``--allow-incomplete``). So one message serves both, and
nothing rewrites it afterwards.

This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

_UNSET = object()
# parameter -> how the caller writes it (the command line's flags); None: Python's keywords.
_SPELLING: ContextVar[Mapping[str, str] | None] = ContextVar("fastinfluence_spelling", default=None)


class FastInfluenceError(ValueError):
    """An input that cannot work; ``param`` names the parameter at fault when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class OptionsError(FastInfluenceError):
    """An options object or keyword argument with a bad value, or both given at once."""


class UsageError(FastInfluenceError):
    """A command-line input that cannot work (a flag, a file it names)."""


@contextmanager
def spelled_as(spelling: Mapping[str, str]) -> Iterator[None]:
    """Within the block, ``name(param)`` gives ``spelling[param]`` (a flag) for the parameters it holds."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


def name(param: str, value: object = _UNSET) -> str:
    """``param`` set to ``value`` as the caller writes it.

    Python: ``param=value`` (``param`` alone without a value). Command line: the flag, alone
    for ``True`` or no value, followed by the value otherwise (``--max-tokens 4``).
    """
    flag = (_SPELLING.get() or {}).get(param)
    if flag is None:
        return param if value is _UNSET else f"{param}={value!r}"
    if value is _UNSET or value is True or not flag.startswith("-"):
        return flag
    return f"{flag} {value}"


def label(param: str) -> str:
    """How a message introduces the value of ``param``: ``param=`` in Python, the flag on the command line."""
    flag = (_SPELLING.get() or {}).get(param)
    return f"{param}=" if flag is None else flag


def switches(**values: bool) -> str:
    """Boolean parameters as the caller writes them: ``tokens=True, covariances=False`` in Python,
    ``--tokens`` (or ``neither --tokens nor --covariances``) on the command line."""
    if _SPELLING.get() is None:
        return ", ".join(f"{k}={v!r}" for k, v in values.items())
    on = [name(k) for k, v in values.items() if v]
    if on:
        return " ".join(on)
    flags = [name(k) for k in values]
    return f"neither {' nor '.join(flags)}" if len(flags) == 2 else f"none of {', '.join(flags)}"
