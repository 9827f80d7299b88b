"""CUDA kernels of csrc/ on the GPU: jl_project against TRAK's projectors, top-k selection.

jl_project providers (median of do_bench):

* ``fastinfluence-cuda``: the CUDA kernel (no stored matrix, output identical to the CPU);
* ``trak-cuda``: ``trak.projectors.CudaProjector`` when TRAK and its fast_jl kernel import
  (it needs k a multiple of 512 and B <= 32 per call; its output depends on the SM count);
* ``trak-basic``: ``trak.projectors.BasicProjector`` on the GPU when TRAK imports;
* ``blockwise-torch``: BasicProjector's algorithm written out (regenerate 100 columns of
  R with torch's generator, multiply, repeat), so there is a baseline without TRAK;
* ``stored-matmul``: x @ R with R already in memory: the matmul floor at D*k*4 bytes.

score_topk: the warp-per-row selection against the torch reference (two sorts).

Goal (measured, not asserted): >= 5x TRAK's throughput on the same device.
Usage: python bench/gpu_jl_project.py --out DIR      (writes DIR/jl_project_gpu.json)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_floors  # noqa: E402

from fastinfluence.ops.score_topk import score_topk_reference  # noqa: E402

TRAK_KIND = {"rademacher": "rademacher", "gaussian": "normal"}
SHAPES = [(1, 1 << 22, 4096), (8, 1 << 22, 4096), (32, 1 << 22, 4096), (32, 1 << 20, 16384)]


def blockwise_torch(x: torch.Tensor, k: int, kind: str, block: int = 100) -> torch.Tensor:
    gen = torch.Generator(device=x.device).manual_seed(0)
    out = torch.empty(x.shape[0], k, device=x.device)
    R = torch.empty(x.shape[1], block, device=x.device)
    for start in range(0, k, block):
        if kind == "gaussian":
            R.normal_(generator=gen)
        else:
            R.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        stop = min(k, start + block)
        out[:, start:stop] = x @ R[:, : stop - start]
    return out


def trak_projectors(D: int, k: int, kind: str) -> dict:
    """TRAK's projectors that load here, by provider name (a reason string when one does not)."""
    found = {}
    try:
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType
    except ImportError as exc:
        return {"trak": f"unavailable: {exc}"}
    ptype = ProjectionType(TRAK_KIND[kind])
    found["trak-basic"] = BasicProjector(grad_dim=D, proj_dim=k, seed=0, proj_type=ptype, device="cuda")
    try:
        found["trak-cuda"] = CudaProjector(grad_dim=D, proj_dim=k, seed=0, proj_type=ptype, device="cuda",
                                           max_batch_size=32)
    except Exception as exc:  # fast_jl missing or unsupported shape
        found["trak-cuda"] = f"unavailable: {type(exc).__name__}: {exc}"
    return found


def jl_rows(cuda, B: int, D: int, k: int, kind: str, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(B, D, device="cuda", dtype=dtype)
    shape = f"B={B} D={D} k={k} {kind} {str(dtype).replace('torch.', '')}"
    rows = []

    def add(provider, fn=None, note=None, matrix_bytes=0):
        row = {"kernel": "jl_project", "provider": provider, "shape": shape}
        if fn is None:
            row["note"] = note
        else:
            ms = gpu_floors.median_ms(fn)
            row |= {"ms": ms, "value": round(B * D * k / ms / 1e9, 2), "unit": "T multiply-adds/s",
                    "matrix_bytes": matrix_bytes}
        rows.append(row)
        print(row, flush=True)

    add("fastinfluence-cuda", lambda: cuda.jl_project(x, k, 0, kind, 0))
    xf = x.float()
    for name, proj in trak_projectors(D, k, kind).items():
        if isinstance(proj, str):
            add(name, note=proj)
        else:
            add(name, lambda: proj.project(xf, model_id=0), matrix_bytes=D * 100 * 4 if name == "trak-basic" else 0)
    add("blockwise-torch", lambda: blockwise_torch(xf, k, kind), matrix_bytes=D * 100 * 4)
    if D * k * 4 <= 8 << 30:
        R = torch.randn(D, k, device="cuda", dtype=dtype)
        add("stored-matmul", lambda: x @ R, matrix_bytes=D * k * x.element_size())
        del R
    ours = rows[0]["ms"]
    for row in rows[1:]:
        if "ms" in row:
            row["ours_speedup"] = round(row["ms"] / ours, 2)
    return rows


def topk_rows(cuda) -> list[dict]:
    rows = []
    for Q, n, k in [(16, 1 << 20, 100), (256, 1 << 18, 1000)]:
        torch.manual_seed(0)
        q, x = torch.randn(Q, 64, device="cuda"), torch.randn(n, 64, device="cuda")
        for provider, fn in [("fastinfluence-cuda", lambda: cuda.score_topk(q, x, k)),
                             ("torch-reference", lambda: score_topk_reference(q, x, k))]:
            ms = gpu_floors.median_ms(fn)
            rows.append({"kernel": "score_topk", "provider": provider, "shape": f"Q={Q} n={n} D=64 k={k}", "ms": ms})
            print(rows[-1], flush=True)
    return rows


def device_checks(cuda) -> dict:
    from fastinfluence.ops.backends import cpu

    if cpu._ext is None:
        return {"bitwise_equal_to_host_twin": "host twin not built"}
    torch.manual_seed(1)
    x = torch.randn(37, 3001)
    return {f"bitwise_equal_to_host_twin_{kind}": bool(torch.equal(cuda.jl_project(x.cuda(), 517, 3, kind, 0).cpu(),
                                                                  cpu.jl_project(x, 517, 3, kind, 0)))
            for kind in ("rademacher", "gaussian")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    from fastinfluence.ops.backends import cuda

    ok, why = cuda.is_available(torch.device("cuda"))
    if not ok:
        sys.exit(why)
    checks = device_checks(cuda)
    print(checks, flush=True)
    rows = [r for kind in ("rademacher", "gaussian") for B, D, k in SHAPES
            for r in jl_rows(cuda, B, D, k, kind, torch.float32)]
    rows += jl_rows(cuda, 8, 1 << 22, 4096, "rademacher", torch.bfloat16)
    rows += topk_rows(cuda)
    print(gpu_floors.write_results(args.out, "jl_project_gpu", rows, checks=checks))


if __name__ == "__main__":
    main()
