"""A per-test time limit for pytest without pytest-timeout: ``-p gpu_test_timeout`` (``bench/`` on the path).

``GPU_TEST_TIMEOUT_S`` (default 60) bounds the set-up, the call and the tear-down of each
test separately: past it, SIGALRM raises ``TestTimeout`` in the test, which fails it and
lets the next one run. Code blocked inside one C call (a hung kernel launch) is only
interrupted when the call returns; the suite's stage timeout covers that case.
"""

from __future__ import annotations

import os
import signal

import pytest


class TestTimeout(Exception):
    __test__ = False  # not a test class


def _limit() -> float:
    return float(os.environ.get("GPU_TEST_TIMEOUT_S", "60"))


def _timed(phase: str):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item):
        limit = _limit()
        if limit <= 0 or not hasattr(signal, "SIGALRM"):
            yield
            return

        def expire(signum, frame):
            raise TestTimeout(f"{item.nodeid}: {phase} ran past GPU_TEST_TIMEOUT_S={limit:g} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return hook


pytest_runtest_setup = _timed("set-up")
pytest_runtest_call = _timed("call")
pytest_runtest_teardown = _timed("tear-down")
