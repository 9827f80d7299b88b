"""Helpers of ``bench/gpu_suite.sh`` (standard library only, so they run before anything is installed).

* ``pack --work DIR --out OUT``: everything the stages left in DIR (logs, per-bench JSON, the
  pytest XML) goes into ``OUT/suite.tar.gz``; ``OUT/summary.txt`` says what ran, what failed
  and the result rows; the result JSON files are also copied next to them (at most
  ``MAX_JSON``). OUT then holds at most ``MAX_FILES`` files, each under ``MAX_FILE_BYTES``,
  with plain names and no folders: what the GPU machine brings back of its output folder.
  It is safe to run after every stage (each file is replaced atomically), so a run cut
  short still leaves the results of the stages that finished.
* ``overlay --root ROOT --dest DIR``: a directory to put in front of ``PYTHONPATH`` so that
  the source tree imports without an install, subpackages that ``setup.py`` maps to other
  folders (``fastinfluence.triton_kernels`` -> ``triton_kernels/``) included.
* ``check --out OUT``: exit status 1 and one line per problem when OUT breaks the limits.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

MAX_FILES = 8  # files the GPU machine brings back from $OUT
MAX_FILE_BYTES = 16 << 20
MAX_DEPTH = 2  # folders below $OUT
# summary + archive + JSON, plus one transient ".name.tmp" while a file is being replaced
MAX_JSON = MAX_FILES - 3
ARCHIVE = "suite.tar.gz"
SUMMARY = "summary.txt"
VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# JSON of the benches, most wanted first; others stay in the archive when MAX_JSON is reached
JSON_ORDER = ("triton_kernels", "project_cuda", "jl_project_gpu", "floors")
LOG_TAIL_BYTES = 2 << 20  # a longer log keeps its last 2 MiB in the archive
STAGES = "stages.tsv"  # name, status, seconds, note per line (written by gpu_suite.sh)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _archive_bytes(work: Path) -> bytes:
    """tar.gz of every file under ``work`` as ``suite/<relative path>``; long logs keep their tail."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(p for p in work.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if path.suffix != ".json" and len(data) > LOG_TAIL_BYTES:
                data = f"[first {len(data) - LOG_TAIL_BYTES} bytes cut]\n".encode() + data[-LOG_TAIL_BYTES:]
            info = tarfile.TarInfo(f"suite/{path.relative_to(work).as_posix()}")
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _json_results(work: Path) -> list[Path]:
    """Valid result JSON files of ``work``, most wanted first."""
    found = []
    for path in work.glob("*.json"):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a half-written file stays in the archive only
        found.append(path)
    rank = {name: i for i, name in enumerate(JSON_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.name))


def _stages(work: Path) -> list[list[str]]:
    path = work / STAGES
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def _result_lines(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    lines = [
        f"{path.name}: {meta.get('device', '?')}, commit {str(meta.get('commit', '?'))[:12]}, "
        f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, CUDA {meta.get('cuda', '?')}"
    ]
    keys = (
        "value",
        "unit",
        "kernel_ms",
        "rel_err",
        "grad_rel_err",
        "peak_mem_mb",
        "time_vs_materialised",
        "mem_vs_materialised",
        "ours_speedup",
        "vs_floor",
        "note",
        "error",
    )
    for r in data.get("rows", []):
        extra = "  ".join(f"{k}={r[k]}" for k in keys if k in r)
        pct = f"{r['pct_of_floor']:5.1f}%" if isinstance(r.get("pct_of_floor"), (int, float)) else "      "
        ms = f"{r['ms']:10.4f} ms" if isinstance(r.get("ms"), (int, float)) else " " * 13
        name = f"{r.get('kernel', ''):<21} {r.get('provider', ''):<30}"
        lines.append(f"  {name} {ms} {pct}  {r.get('shape', '')}  {extra}")
    for key in ("checks", "errors"):
        if data.get(key):
            lines.append(f"  {key}: {json.dumps(data[key])}")
    return lines


def _pytest_lines(work: Path) -> list[str]:
    log = work / "pytest_gpu.log"
    if not log.exists():
        return []
    text = log.read_text(errors="replace").splitlines()
    bad = [line for line in text if line.startswith(("FAILED", "ERROR"))][:30]
    return ["pytest -m gpu: " + (text[-1] if text else "(empty log)"), *("  " + line for line in bad)]


def summary_text(work: Path, copied: list[str], dropped: list[str]) -> str:
    lines = [f"fastinfluence GPU suite, packed {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    env = work / "env.txt"
    if env.exists():
        lines += ["", "## environment", *env.read_text(errors="replace").splitlines()[-12:]]
    lines += ["", "## stages (status, seconds, note)"]
    lines += [
        f"  {s[0]:<22} {s[1] if len(s) > 1 else '':<10} {s[2] if len(s) > 2 else '':>6}  {' '.join(s[3:])}"
        for s in _stages(work)
    ] or ["  (none recorded)"]
    pytest_lines = _pytest_lines(work)
    if pytest_lines:
        lines += ["", "## tests", *pytest_lines]
    lines += ["", "## results"]
    for path in _json_results(work):
        try:
            lines += _result_lines(path)
        except (ValueError, AttributeError, TypeError, KeyError) as exc:  # a malformed file must not stop the summary
            lines.append(f"{path.name}: unreadable ({type(exc).__name__}: {exc})")
    lines += ["", f"## files: {ARCHIVE} (all logs and JSON), {SUMMARY}, " + (", ".join(copied) or "no JSON")]
    if dropped:
        lines.append(f"  in {ARCHIVE} only (over {MAX_JSON} JSON files): {', '.join(dropped)}")
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path) -> list[str]:
    """Pack ``work`` into ``out`` (see the module docstring); returns the problems of ``check``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / ARCHIVE, _archive_bytes(work))
    results = _json_results(work)
    copied, dropped = [], []
    for path in results:
        if len(copied) < MAX_JSON and VALID_NAME.match(path.name) and path.stat().st_size <= MAX_FILE_BYTES:
            _write_atomic(out / path.name, path.read_bytes())
            copied.append(path.name)
        else:
            dropped.append(path.name)
    text = summary_text(work, copied, dropped)
    problems = check(out)
    if problems:
        text += "\n## output problems\n" + "\n".join(f"  {p}" for p in problems) + "\n"
    _write_atomic(out / SUMMARY, text.encode())
    return problems


def check(out: Path) -> list[str]:
    """What in ``out`` would not come back from the GPU machine (empty when all of it does)."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files under {out}, at most {MAX_FILES} come back")
    for p in files:
        rel = p.relative_to(out)
        if p.is_symlink():
            problems.append(f"{rel}: a link does not come back")
        if len(rel.parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: more than {MAX_DEPTH} folders deep")
        if not all(VALID_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: name outside [A-Za-z0-9._-]")
        if p.is_file() and p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes, over {MAX_FILE_BYTES}")
    return problems


def package_dirs(setup_py: Path) -> dict[str, str]:
    """The ``package_dir`` mapping of ``setup.py``'s ``setup()`` call."""
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == "package_dir":
                    return ast.literal_eval(kw.value)
    return {}


_SITECUSTOMIZE = '''"""Imports {names} from the source tree without an install (bench/gpu_suite.sh)."""
import importlib.util
import sys

_MAP = {mapping!r}


class _SourceTreeFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        folder = _MAP.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder + "/__init__.py", submodule_search_locations=[folder])


sys.meta_path.append(_SourceTreeFinder)
'''


def overlay(root: Path, dest: Path) -> Path:
    """Write ``dest/sitecustomize.py`` mapping the relocated subpackages of ``root``; returns ``dest``.

    Put ``dest`` and ``root`` on ``PYTHONPATH``: top-level packages import from ``root`` (also
    when the working directory is ``root``, where ``python -m`` puts it first on ``sys.path``),
    and the finder serves the subpackages that live elsewhere, as an editable install would.
    """
    root = root.resolve()
    mapping = {
        name: str(root / folder)
        for name, folder in package_dirs(root / "setup.py").items()
        if Path(folder).as_posix() != name.replace(".", "/")
    }
    dest.mkdir(parents=True, exist_ok=True)
    text = _SITECUSTOMIZE.format(names=", ".join(mapping) or "nothing", mapping=mapping)
    (dest / "sitecustomize.py").write_text(text)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="archive, summary and JSON of --work into --out")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("overlay", help="sitecustomize that imports the source tree without an install")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--dest", required=True, type=Path)
    p = sub.add_parser("check", help="problems of --out against the limits of what comes back")
    p.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        problems = pack(args.work, args.out)
    elif args.cmd == "overlay":
        print(overlay(args.root, args.dest))
        return 0
    else:
        problems = check(args.out)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
