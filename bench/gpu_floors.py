"""The two ceilings every kernel is reported against, measured on the device at hand.

* copy bandwidth: a large device-to-device copy, bytes read + bytes written per second;
* bf16 matmul rate: an 8192^3 bfloat16 product through torch (cuBLAS), FLOP/s;
* float32 matmul rate (no TF32): the floor of the jl_project rows.

Also the helpers the GPU benchmark scripts share: timing (``median_ms``: CUDA events around
each call, L2 flushed before each, at least ``min_reps`` calls; ``kernel_ms``: the device
time of the kernels alone, for rows where launch overhead would dominate), run metadata
(device, commit from ``FASTINFLUENCE_COMMIT``, versions) and ``Results``, which rewrites its
JSON file as each row arrives. Run as a script it writes ``floors.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import traceback
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 << 20  # over the L2 of any current GPU (H100/H200: 50 MB)
KERNEL_ONLY_BELOW_MS = 0.2  # rows faster than this also report the kernels' own device time
_flush = None


def _flush_l2() -> None:
    global _flush
    if _flush is None:
        _flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    _flush.zero_()


def median_ms(fn, rep_ms: float = 200, min_reps: int = 10, max_reps: int = 1000, flush_l2: bool = True) -> float:
    """Median milliseconds of ``fn()`` over CUDA events, with L2 flushed before each call.

    Repetitions: about ``rep_ms`` of calls, never fewer than ``min_reps`` (slow kernels) nor
    more than ``max_reps``. Two calls warm up (autotuning, compilation) first.
    """
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        if flush_l2:
            _flush_l2()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def kernel_ms(fn, reps: int = 50) -> float:
    """Mean device time per call of the CUDA kernels ``fn()`` launches (profiler), without host gaps."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    device = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]  # kernels, copies, memsets
    if not device:
        raise RuntimeError("the profiler recorded no CUDA kernel")
    return sum(e.device_time_total for e in device) / 1e3 / reps


def timing(fn) -> dict:
    """``{"ms": median}`` plus ``kernel_ms`` when the median is under KERNEL_ONLY_BELOW_MS."""
    ms = median_ms(fn)
    out = {"ms": round(ms, 5), "l2_flushed": True}
    if ms < KERNEL_ONLY_BELOW_MS:
        try:
            out["kernel_ms"] = round(kernel_ms(fn), 5)
        except Exception as exc:  # the profiler is optional for a row
            out["kernel_ms_error"] = f"{type(exc).__name__}: {exc}"
    return out


def copy_bandwidth(nbytes: int = 2**31) -> float:
    """Device-to-device copy rate in bytes/s, counting the bytes read and the bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def bf16_matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bfloat16 product on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def fp32_matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n float32 product with TF32 off (IEEE float32, as jl_project computes)."""
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ms = median_ms(lambda: a @ b, min_reps=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / (ms * 1e-3)


def measure_floors() -> dict:
    return {
        "copy_bytes_per_s": copy_bandwidth(),
        "bf16_flop_per_s": bf16_matmul_rate(),
        "fp32_flop_per_s": fp32_matmul_rate(),
    }


def load_floors(path: str | Path | None) -> dict | None:
    """The ``floors`` of a floors.json written by this script (None when absent or unreadable)."""
    try:
        floors = json.loads(Path(path).read_text())["floors"]
        return floors if {"copy_bytes_per_s", "bf16_flop_per_s"} <= set(floors) else None
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _git_commit() -> str:
    """``FASTINFLUENCE_COMMIT`` (the caller's ``git rev-parse HEAD``), else git here, else "unknown"."""
    if os.environ.get("FASTINFLUENCE_COMMIT"):
        return os.environ["FASTINFLUENCE_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata() -> dict:
    """Device name, commit and versions recorded with every result file."""
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "commit": _git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def write_results(out_dir: str | Path, name: str, rows: list[dict], **extra) -> Path:
    """Write ``{"meta": ..., **extra, "rows": rows}`` to ``out_dir/name.json`` (atomically)."""
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"meta": metadata(), **extra, "rows": rows}, indent=1))
    os.replace(tmp, path)
    return path


class Results:
    """Rows of one result file, rewritten after every ``add`` so a run cut short keeps what it measured.

    Each row records the triton and torch versions it was timed with. ``section(name)`` is a
    context manager: an exception inside it becomes an ``error`` row (and an entry of
    ``errors``) and the next section runs.
    """

    def __init__(self, out_dir: str | Path, name: str, **extra):
        self.out_dir, self.name, self.extra = out_dir, name, extra
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self._versions = _versions()
        self.path = self.write()

    def write(self) -> Path:
        extra = {**self.extra, **({"errors": self.errors} if self.errors else {})}
        return write_results(self.out_dir, self.name, self.rows, **extra)

    def add(self, row: dict) -> dict:
        row = {**row, "triton": self._versions["triton"], "torch": self._versions["torch"]}
        self.rows.append(row)
        print(row, flush=True)
        self.write()
        return row

    def section(self, name: str):
        return _Section(self, name)


class _Section:
    def __init__(self, results: Results, name: str):
        self.results, self.name = results, name

    def __enter__(self):
        print(f"-- {self.name}", flush=True)
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, Exception):
            return False
        message = f"{kind.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        traceback.print_exception(kind, exc, tb)
        self.results.errors.append({"section": self.name, "error": message})
        self.results.add({"kernel": self.name, "provider": "", "shape": "", "error": message})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return True  # the next section runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for floors.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_floors: needs a CUDA device")
    floors = measure_floors()
    results = Results(args.out, "floors", floors=floors)
    results.add(
        {
            "kernel": "copy",
            "shape": "2 GiB",
            "provider": "torch",
            "value": round(floors["copy_bytes_per_s"] / 1e12, 3),
            "unit": "TB/s",
        }
    )
    results.add(
        {
            "kernel": "matmul bf16",
            "shape": "8192^3",
            "provider": "torch",
            "value": round(floors["bf16_flop_per_s"] / 1e12, 1),
            "unit": "TFLOP/s",
        }
    )
    results.add(
        {
            "kernel": "matmul fp32 (no TF32)",
            "shape": "8192^3",
            "provider": "torch",
            "value": round(floors["fp32_flop_per_s"] / 1e12, 1),
            "unit": "TFLOP/s",
        }
    )
    print(results.path)


if __name__ == "__main__":
    main()
