"""What a fresh clone on another machine needs: every benchmark script answers ``--help``, no
tracked file points into one machine's directories, and ``make demo`` installs only the demo's needs.

``--help`` of the ~30 scripts in their own interpreters would import torch ~30 times (a minute or
two of CPU on a shared 2-core machine); instead one driver process imports torch and transformers
once and forks a child per script that runs it as ``python bench/x.py --help`` would: as
``__main__``, with its own directory first on ``sys.path``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# bench files that are not commands (pattern under bench/ -> why there is no --help to check)
NOT_COMMANDS = {
    "_common.py": "helpers the benchmark scripts import",
    "conftest.py": "fixtures of the pytest-benchmark suites",
    "gpu_test_timeout.py": "a pytest plugin of the GPU suite (-p gpu_test_timeout)",
    "test_*.py": "pytest-benchmark suites, run by `make bench`",
    "peers/common.py": "the peers' shared model, data and runner entry point, imported in each peer's virtualenv",
    "peers/run_*.py": "workers that peers/run_all.py starts in a peer's own virtualenv with positional arguments; "
    "they import the peer's package, absent from ours",
}
HELP_TIMEOUT_S = 60  # per script; --help parses its arguments before any work


def bench_files() -> list[str]:
    return sorted(str(p.relative_to(BENCH)) for p in [*BENCH.glob("*.py"), *BENCH.glob("peers/*.py")])


def bench_commands() -> list[str]:
    return [f for f in bench_files() if not any(fnmatch.fnmatch(f, pattern) for pattern in NOT_COMMANDS)]


def test_every_bench_file_is_a_command_or_says_why_not():
    for pattern in NOT_COMMANDS:
        assert fnmatch.filter(bench_files(), pattern), f"NOT_COMMANDS entry {pattern!r} matches no bench file"
    for name in bench_commands():
        assert 'if __name__ == "__main__":' in (BENCH / name).read_text(), (
            f"bench/{name} is not a script: give it a __main__ and argparse, or list it in NOT_COMMANDS with why"
        )


def test_every_bench_script_answers_help():
    scripts = [str(BENCH / name) for name in bench_commands()]
    out = subprocess.run(
        [sys.executable, __file__, *scripts], capture_output=True, text=True, timeout=120 + 5 * len(scripts)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    failed = {
        name: text[-1500:]
        for name, (code, text) in json.loads(out.stdout).items()
        if code != 0 or not text.lstrip().startswith("usage:")
    }
    assert not failed, "`--help` failed (exit code or no usage line):\n" + "\n".join(
        f"--- {name}\n{text}" for name, text in failed.items()
    )


def _help_of_each(scripts: list[str]) -> dict[str, tuple[int, str]]:
    """Driver: {script: (exit code, stdout + stderr)} of ``python script --help``, one fork each."""
    import signal

    import torch  # noqa: F401  (shared by every child instead of imported by each)
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    results = {}
    for script in scripts:
        with tempfile.TemporaryFile("w+") as log:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.alarm(HELP_TIMEOUT_S)
                    os.dup2(log.fileno(), 1)
                    os.dup2(log.fileno(), 2)
                    sys.argv, sys.path[0] = [script, "--help"], str(Path(script).parent)
                    import runpy

                    runpy.run_path(script, run_name="__main__")
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            log.seek(0)
            results[str(Path(script).relative_to(BENCH))] = (os.waitstatus_to_exitcode(status), log.read())
    return results


# An absolute path into a home, a worktree or a temporary directory (/work/..., /root/..., /home/<user>,
# /tmp/..., /Users/<user>); after a name character or a dot it is part of a relative path or a URL.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|tmp|Users|home/\w)")
# Where such a path is expected: path glob -> the match allowed there.
ALLOWED = {
    # a benchmark's record of one run names the temporary directory its scores were kept in
    "bench/results/*.json": re.compile(r"/tmp/"),
    # the examples of this check, below
    "tests/test_repo_hygiene.py": MACHINE_PATH,
}


def machine_paths(path: str, text: str) -> list[str]:
    """The lines of ``text`` (the file at ``path``) with a match that ``ALLOWED`` does not cover."""
    allowed = [rx for glob, rx in ALLOWED.items() if fnmatch.fnmatch(path, glob)]
    return [
        f"{path}:{n}: {line.strip()[:160]}"
        for n, line in enumerate(text.splitlines(), 1)
        if any(not any(rx.match(line, m.start()) for rx in allowed) for m in MACHINE_PATH.finditer(line))
    ]


def test_no_tracked_file_holds_an_absolute_machine_path():
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    found = []
    for path in listed.stdout.decode().split("\0"):
        data = (ROOT / path).read_bytes() if path and (ROOT / path).is_file() else b"\0"
        if b"\0" not in data:  # text files only
            found += machine_paths(path, data.decode("utf-8", errors="replace"))
    assert not found, "absolute paths of one machine in tracked files (make them relative or temporary):\n" + (
        "\n".join(found)
    )


def test_the_path_check_catches_what_it_should():
    for text in ['KRON = "/work/wt/i14/.peers/x"', "default=/tmp/run", "cd /root/x", "/home/alice/x", "(/Users/bob)"]:
        assert machine_paths("bench/x.py", text), text
    for text in ["bench/work/x", "https://github.com/root/x", "~/.cache/x", "$HOME/x", "/usr/local/cuda", "a/tmp/b"]:
        assert not machine_paths("bench/x.py", text), text
    assert not machine_paths("bench/results/x.json", '"scores_dir": "/tmp/kfac_1/rep0"')
    assert machine_paths("bench/results/x.json", '"model": "/home/alice/llama"')


def make_dry_run(target: str, venv: Path) -> str:
    """The commands ``make TARGET`` would run with ``VENV=venv`` (``make -n``: nothing is installed)."""
    out = subprocess.run(
        ["make", "-n", f"VENV={venv}", target], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_only_what_the_demo_needs_and_test_adds_the_rest(tmp_path):
    venv = tmp_path / "venv"
    demo, test = make_dry_run("demo", venv), make_dry_run("test", venv)
    assert "pip install -q -e . matplotlib" in demo and "[test" not in demo and "triton" not in demo
    assert '-e ".[test,peft,triton,faiss]"' in test and "-m pytest" in test
    venv.mkdir()
    (venv / ".demo-installed").touch()  # after `make demo`, `make test` adds the extras alone
    test = make_dry_run("test", venv)
    assert "[test,peft,triton,faiss]" in test and "torch" not in test
    (venv / ".installed").touch()
    assert "pip" not in make_dry_run("demo-quick", venv)  # after both, in either order, nothing to install


if __name__ == "__main__":
    print(json.dumps(_help_of_each(sys.argv[1:])))
