"""bench/results_from_benchmark.py turns pytest-benchmark JSON into the bench/results records."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "results_from_benchmark.py"


def _converter():
    spec = importlib.util.spec_from_file_location("results_from_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(name, group, median, **extra):
    stats = dict(min=median * 0.9, max=median * 1.2, mean=median * 1.05, stddev=0.01, rounds=5, median=median)
    return {
        "fullname": f"bench/test_x.py::{name}",
        "group": group,
        "stats": stats,
        "options": {"timer": "process_time"},
        "extra_info": {"threads": 1, **extra},
    }


def test_convert(tmp_path, monkeypatch):
    raw = {
        "machine_info": {"machine": "x86_64", "node": "n", "cpu": {"brand_raw": "CPU", "count": 2, "flags": []}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False, "branch": "b"},
        "datetime": "2026-01-01T00:00:00",
        "version": "5.0",
        "benchmarks": [
            _bench(
                "test_op[project-torch]",
                "ops",
                0.002,
                op="project",
                backend="cpu",
                ran="torch",
                fallback="no kernel",
                device="cpu",
                size="small",
                flops=4e6,
                rel_err_vs_torch=0.0,
                torch="2.x",
            ),
            _bench("test_train_step", "extract", 0.3, case="train_step", layers="all", path="train"),
            _bench("test_extract[full-lm_head]", "extract", 0.2, case="extract", layers="lm_head", path="full"),
            _bench(
                "test_extract[truncated-lm_head]", "extract", 0.05, case="extract", layers="lm_head", path="truncated"
            ),
        ],
    }
    src = tmp_path / "raw.json"
    src.write_text(json.dumps(raw))
    monkeypatch.setattr(sys, "argv", ["x", str(src), "--results", str(tmp_path)])
    _converter().main()
    ops = json.loads((tmp_path / "ops_cpu.json").read_text())
    (row,) = ops["rows"]
    assert row["ran"] == "torch" and row["backend"] == "cpu" and row["fallback"] == "no kernel"
    assert row["gflops"] == pytest.approx(4e6 / 0.002 / 1e9) and ops["meta"]["commit"] == "0123456"
    rec = json.loads((tmp_path / "pytest_bench_cpu.json").read_text())
    assert len(rec["rows"]) == 4 and rec["meta"]["commit"]["id"] == "0123456789ab"
    assert rec["derived"]["lm_head/truncated/speedup_vs_full"] == pytest.approx(4.0)
    assert rec["derived"]["lm_head/full/over_train_step"] == pytest.approx(0.2 / 0.3)


def test_empty_json_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "raw.json"
    src.write_text(json.dumps({"benchmarks": []}))
    monkeypatch.setattr(sys, "argv", ["x", str(src), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="no benchmark"):
        _converter().main()
