"""bench/gpu_suite.sh without a GPU: what it leaves under $OUT fits what the GPU machine brings back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_suite_lib as lib  # noqa: E402


def _fake_stage_outputs(work: Path) -> dict[str, bytes]:
    """What a full run leaves in its work folder: logs, pytest XML, more JSON than may come back."""
    files = {
        f"{name}.log": f"log of {name}\n".encode() * 50
        for name in (
            "install",
            "cuda_build",
            "pytest_gpu",
            "gpu_floors",
            "gpu_bench_triton",
            "gpu_project_cuda",
            "gpu_jl_project",
        )
    }
    files["pytest_gpu.log"] = b"....F.\nFAILED tests/test_x.py::test_y - AssertionError\n1 failed, 5 passed in 9.1s\n"
    files["env.txt"] = b"torch 2.11 cuda 13.0 triton 3.6.0\ndevice NVIDIA H200\n"
    files["pytest_gpu.xml"] = b"<testsuites/>"
    files["stages.tsv"] = (
        b"environment\tok\t2\t\npytest -m gpu\tfailed\t80\texit code 1\nfloors\ttimeout\t60\tstopped\n"
    )
    files["huge.log"] = b"x" * (lib.MAX_FILE_BYTES + 1)  # a runaway log must not break the 16 MiB limit
    rows = [{"kernel": "score_topk", "provider": "triton", "shape": "Q=16", "ms": 0.1, "pct_of_floor": 80.0}]
    for name in ("triton_kernels", "project_cuda", "jl_project_gpu", "floors", "extra_a", "extra_b", "extra_c"):
        files[f"{name}.json"] = json.dumps(
            {"meta": {"device": "H200", "commit": "abc", "triton": "3.6.0"}, "rows": rows}
        ).encode()
    files["broken.json"] = b'{"rows": ['  # cut short by a timeout
    for name, data in files.items():
        (work / name).write_bytes(data)
    return files


def test_pack_keeps_every_result_within_the_output_limits(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    files = _fake_stage_outputs(work)
    assert lib.pack(work, out) == []
    lib.pack(work, out)  # packing again after the next stage replaces, never adds
    produced = sorted(p.name for p in out.rglob("*"))
    assert len(produced) <= lib.MAX_FILES, produced
    assert lib.check(out) == []
    assert all(lib.VALID_NAME.match(name) for name in produced)
    assert all(p.stat().st_size <= lib.MAX_FILE_BYTES for p in out.iterdir())
    copied = [name for name in produced if name.endswith(".json")]
    assert len(copied) == lib.MAX_JSON  # the most wanted ones, valid JSON only
    assert {"triton_kernels.json", "project_cuda.json", "jl_project_gpu.json", "floors.json"} <= set(copied)
    assert "broken.json" not in copied
    with tarfile.open(out / lib.ARCHIVE) as tar:
        names = {m.name.removeprefix("suite/") for m in tar.getmembers()}
        assert names == set(files)  # every log and every JSON, also those not copied
        assert tar.extractfile("suite/huge.log").read().endswith(b"x" * 100)
    summary = (out / lib.SUMMARY).read_text()
    assert "pytest -m gpu" in summary and "timeout" in summary
    assert "FAILED tests/test_x.py::test_y" in summary and "1 failed, 5 passed" in summary
    assert "score_topk" in summary and "extra_c.json" in summary  # rows shown; what stayed in the archive named


def test_check_names_what_would_not_come_back(tmp_path):
    for i in range(lib.MAX_FILES + 1):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("")
    (tmp_path / "bad name.txt").write_text("")
    problems = "\n".join(lib.check(tmp_path))
    assert f"{lib.MAX_FILES + 3} files" in problems
    assert "deep.txt: more than 2 folders deep" in problems
    assert "bad name.txt: name outside" in problems


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_suite_without_a_gpu_says_so_and_exits_0(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "SUITE_BUDGET_S": "60",
        "FASTINFLUENCE_COMMIT": "0123abc",
        "CUDA_VISIBLE_DEVICES": "",
        "TMPDIR": str(tmp_path),
    }
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no CUDA device" in run.stdout
    out = tmp_path / "out"
    assert lib.check(out) == [] and {p.name for p in out.iterdir()} == {lib.ARCHIVE, lib.SUMMARY}
    summary = (out / lib.SUMMARY).read_text()
    assert "no CUDA device" in summary and "commit 0123abc" in summary


def test_the_command_in_the_script_header_is_the_runbook_s():
    script = (ROOT / "bench" / "gpu_suite.sh").read_text().splitlines()
    header = [line.removeprefix("#").strip() for line in script[:16]]
    commands = [line for line in header if line.startswith("FASTINFLUENCE_COMMIT=")]
    assert len(commands) == 3 and "SKIP_BENCH=1" in commands[1] and "SKIP_TESTS=1" in commands[2]
    runbook = (ROOT / "docs" / "gpu.md").read_text()
    assert all(command in runbook for command in commands), commands


def test_overlay_imports_the_relocated_subpackages_from_the_tree(tmp_path):
    assert lib.package_dirs(ROOT / "setup.py").get("fastinfluence.triton_kernels") == "triton_kernels"
    # A tree laid out like this one: pkg/ and, mapped into it by setup.py, kernels/ as pkg.kernels.
    tree = tmp_path / "tree"
    for folder in ("pkg", "kernels"):
        (tree / folder).mkdir(parents=True)
        (tree / folder / "__init__.py").write_text(f"WHERE = {folder!r}\n")
    (tree / "kernels" / "mod.py").write_text("VALUE = 7\n")
    (tree / "setup.py").write_text(
        "from setuptools import setup\n"
        'setup(packages=["pkg", "pkg.kernels"],\n'
        '      package_dir={"pkg": "pkg", "pkg.kernels": "kernels"})\n'
    )
    overlay = lib.overlay(tree, tmp_path / "overlay")
    env = {**os.environ, "PYTHONPATH": f"{overlay}{os.pathsep}{tree}"}
    code = "import pkg.kernels.mod as m, pkg; print(pkg.WHERE, pkg.kernels.WHERE, m.VALUE, m.__file__)"
    # from the tree's root, as the suite runs pytest (./pkg comes first on sys.path there)
    run = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["pkg", "kernels", "7", str(tree / "kernels" / "mod.py")]
    bare = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env={**env, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.returncode != 0 and "ModuleNotFoundError" in bare.stderr  # what the overlay is for


def test_per_test_timeout_fails_a_hung_test_and_runs_the_next(tmp_path):
    (tmp_path / "test_hang.py").write_text(
        "import time\n\ndef test_hangs():\n    time.sleep(30)\n\ndef test_next():\n    assert True\n"
    )
    env = {**os.environ, "GPU_TEST_TIMEOUT_S": "1", "PYTHONPATH": str(ROOT / "bench")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_test_timeout", "test_hang.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout and "GPU_TEST_TIMEOUT_S=1" in run.stdout
