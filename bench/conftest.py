"""pytest-benchmark suites of the CPU benchmarks: ``pytest bench/ --benchmark-json=PATH``.

Not collected by the test suite (``testpaths = ["tests"]``). Every suite runs on one thread
(``BENCH_THREADS`` to change it) with ``BENCH_ROUNDS`` timed rounds per case (default 5) after
one warm-up round; ``make bench`` times them in CPU seconds (``--benchmark-timer
time.process_time``), the fair measure on a shared machine. ``bench/results_from_benchmark.py``
turns the JSON into ``bench/results/`` records with the commit and machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the test extra) to run bench/")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))


@pytest.fixture
def timed(benchmark):
    """``timed(fn, **info)``: ``fn`` timed over ``ROUNDS`` rounds after a warm-up, ``info`` kept in
    the benchmark's ``extra_info`` (what the results converter reads); returns fn's result."""

    def run(fn, group: str | None = None, rounds: int = ROUNDS, **info):
        benchmark.group = group
        benchmark.extra_info.update(info)
        benchmark.extra_info["threads"] = torch.get_num_threads()
        out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info["loadavg_1min"] = os.getloadavg()[0]  # machine load while it ran
        return out

    return run
