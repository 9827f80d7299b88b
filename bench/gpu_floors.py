"""The two ceilings every kernel is reported against, measured on the device at hand.

* copy bandwidth: a large device-to-device copy, bytes read + bytes written per second;
* bf16 matmul rate: an 8192^3 bfloat16 product through torch (cuBLAS), FLOP/s.

Also the helpers the GPU benchmark scripts share: timing (median of ``do_bench``), run
metadata (device, commit, versions) and the JSON layout. Run as a script it writes
``floors.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time of ``fn()`` in milliseconds (CUDA events via triton's do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


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


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FASTINFLUENCE_COMMIT", "unknown")


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


def write_results(out_dir: str | Path, name: str, rows: list[dict], **extra) -> Path:
    """Write ``{"meta": ..., **extra, "rows": rows}`` to ``out_dir/name.json``."""
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": metadata(), **extra, "rows": rows}, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for floors.json")
    args = parser.parse_args()
    floors = {"copy_bytes_per_s": copy_bandwidth(), "bf16_flop_per_s": bf16_matmul_rate()}
    rows = [
        {"kernel": "copy", "shape": "2 GiB", "provider": "torch", "value": floors["copy_bytes_per_s"] / 1e12, "unit": "TB/s"},
        {"kernel": "matmul bf16", "shape": "8192^3", "provider": "torch", "value": floors["bf16_flop_per_s"] / 1e12, "unit": "TFLOP/s"},
    ]
    print(write_results(args.out, "floors", rows, floors=floors))


if __name__ == "__main__":
    main()
