"""jl_project on this CPU against TRAK's BasicProjector at equal D and k.

Providers, each timed as the median of a few calls:

* ``fastinfluence-cpu``: the C++/OpenMP host twin (no stored matrix);
  (providers are timed in turns, so load from other processes falls on all alike)
* ``trak-basic``: ``trak.projectors.BasicProjector`` with its default block size (the
  matrix is regenerated block by block with torch's generator on every call);
* ``stored-matmul``: ``x @ R`` with R (D x k float32) already in memory: the matmul floor
  a stored matrix would reach, at the cost of D * k * 4 bytes.

Goal (measured, not asserted): >= 5x trak-basic's throughput. Needs traker, installed
without its dependencies: ``pip install --no-deps traker``.

Usage: python bench/bench_jl_project.py [--quick] [--out bench/results/jl_project_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_floors  # noqa: E402  (metadata: commit and versions)
from _common import interleaved_medians  # noqa: E402

from fastinfluence.ops.backends import cpu  # noqa: E402

TRAK_KIND = {"rademacher": "rademacher", "gaussian": "normal"}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def run(B: int, D: int, k: int, kind: str, repeats: int) -> list[dict]:
    from trak.projectors import BasicProjector, ProjectionType

    torch.manual_seed(0)
    x = torch.randn(B, D)
    shape = f"B={B} D={D} k={k} {kind}"
    rows = []

    def row(provider, seconds, **extra):
        rows.append(
            {
                "kernel": "jl_project",
                "provider": provider,
                "shape": shape,
                "ms": seconds * 1e3,
                "value": round(B * D * k / seconds / 1e9, 3),
                "unit": "G multiply-adds/s",
                **extra,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    trak = BasicProjector(grad_dim=D, proj_dim=k, seed=0, proj_type=ProjectionType(TRAK_KIND[kind]), device="cpu")
    R = torch.randn(D, k)
    seconds = interleaved_medians(
        {
            "fastinfluence-cpu": lambda: cpu.jl_project(x, k, 0, kind, 0),
            "trak-basic": lambda: trak.project(x, model_id=0),
            "stored-matmul": lambda: x @ R,
        },
        repeats,
    )
    row("fastinfluence-cpu", seconds["fastinfluence-cpu"], matrix_bytes=0)
    row("trak-basic", seconds["trak-basic"], matrix_bytes=D * trak.block_size * 4)
    row("stored-matmul", seconds["stored-matmul"], matrix_bytes=D * k * 4)
    fast, slow = rows[0]["ms"], rows[1]["ms"]
    rows[0]["speedup_vs_trak"] = round(slow / fast, 2)
    return rows


def identical_across_threads(kind: str) -> bool:
    x = torch.randn(33, 5000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = cpu.jl_project(x, 300, 1, kind, 0)
    torch.set_num_threads(threads)
    return bool(torch.equal(one, cpu.jl_project(x, 300, 1, kind, 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (checks the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "jl_project_cpu.json"))
    args = parser.parse_args()
    if cpu._ext is None:
        sys.exit("the C++ host kernels are not built (pip install -e .)")
    shapes = (
        [(2, 4096, 256)] if args.quick else [(1, 65536, 1024), (8, 65536, 1024), (32, 65536, 1024), (8, 65536, 4096)]
    )
    rows = [r for kind in ("rademacher", "gaussian") for B, D, k in shapes for r in run(B, D, k, kind, args.repeats)]
    meta = {
        **gpu_floors.metadata(),
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }
    import trak

    meta["traker"] = getattr(trak, "__version__", "unknown")
    checks = {
        f"bitwise_equal_1_vs_{torch.get_num_threads()}_threads_{kind}": identical_across_threads(kind)
        for kind in ("rademacher", "gaussian")
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
