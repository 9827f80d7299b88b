"""CUDA kernels of csrc/ on the GPU: jl_project against TRAK's projectors, top-k selection.

jl_project providers (median of do_bench):

* ``fastinfluence-cuda``: the CUDA kernel (no stored matrix, output identical to the CPU);
* ``trak-cuda``: ``trak.projectors.CudaProjector`` when TRAK and its fast_jl kernel import
  (it needs k a multiple of 512 and B <= 32 per call; its output depends on the SM count);
* ``trak-basic``: ``trak.projectors.BasicProjector`` on the GPU when TRAK imports;
* ``blockwise-torch``: BasicProjector's algorithm written out (regenerate 100 columns of
  R with torch's generator, multiply, repeat), so there is a baseline without TRAK;
* ``stored-matmul (D slice, scaled)``: x @ R with R already in memory, timed on the first
  rows of D that keep R under 1 GiB and scaled to D (the full R, D*k*4 bytes, would not fit).

Every row also has ``floor_ms``: reading x at the measured copy bandwidth or its B*D*k
multiply-adds at the measured float32 (no TF32) matmul rate, whichever is longer.

score_topk: the warp-per-row selection against the torch reference (two sorts).

Goal (measured, not asserted): >= 5x TRAK's throughput on the same device; the CUDA output
bit-identical to the CPU host twin's (``checks``). Each part that fails leaves an ``error``
row and the next part runs; the JSON is rewritten after every row.
Usage: python bench/gpu_jl_project.py --out DIR [--floors DIR/floors.json]   (writes DIR/jl_project_gpu.json)
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
STORED_BYTES = 1 << 30  # the slice of R the stored-matmul row keeps in memory


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
        found["trak-cuda"] = CudaProjector(
            grad_dim=D, proj_dim=k, seed=0, proj_type=ptype, device="cuda", max_batch_size=32
        )
    except Exception as exc:  # fast_jl missing or unsupported shape
        found["trak-cuda"] = f"unavailable: {type(exc).__name__}: {exc}"
    return found


def jl_rows(cuda, floors: dict, B: int, D: int, k: int, kind: str, dtype: torch.dtype):
    torch.manual_seed(0)
    x = torch.randn(B, D, device="cuda", dtype=dtype)
    shape = f"B={B} D={D} k={k} {kind} {str(dtype).replace('torch.', '')}"
    floor_ms = 1e3 * max(x.nbytes / floors["copy_bytes_per_s"], 2 * B * D * k / floors["fp32_flop_per_s"])
    rows = []

    def add(provider, fn=None, note=None, matrix_bytes=0, scale=1.0):
        row = {"kernel": "jl_project", "provider": provider, "shape": shape}
        if fn is None:
            row["note"] = note
        else:
            t = gpu_floors.timing(fn)
            if scale != 1.0:
                t = {"ms": round(t["ms"] * scale, 5), "measured_ms": t["ms"], "scaled_by": round(scale, 3)}
            row |= {
                **t,
                "value": round(B * D * k / t["ms"] / 1e9, 2),
                "unit": "T multiply-adds/s",
                "matrix_bytes": matrix_bytes,
                "floor_ms": round(floor_ms, 5),
                "pct_of_floor": round(100 * floor_ms / t["ms"], 1),
            }
        rows.append(row)
        return row

    yield add("fastinfluence-cuda", lambda: cuda.jl_project(x, k, 0, kind, 0))
    xf = x.float()
    for name, proj in trak_projectors(D, k, kind).items():
        if isinstance(proj, str):
            yield add(name, note=proj)
        else:
            yield ratio(
                add(
                    name, lambda: proj.project(xf, model_id=0), matrix_bytes=D * 100 * 4 if name == "trak-basic" else 0
                ),
                rows[0],
            )
    yield ratio(add("blockwise-torch", lambda: blockwise_torch(xf, k, kind), matrix_bytes=D * 100 * 4), rows[0])
    Ds = min(D, max(1, STORED_BYTES // (k * x.element_size())))
    R = torch.randn(Ds, k, device="cuda", dtype=dtype)
    xs = x[:, :Ds].contiguous()
    yield ratio(
        add(
            "stored-matmul" + (" (D slice, scaled)" if Ds < D else ""),
            lambda: xs @ R,
            matrix_bytes=D * k * x.element_size(),
            scale=D / Ds,
        ),
        rows[0],
    )
    R = xs = None  # free the device buffers


def ratio(row: dict, ours: dict) -> dict:
    """``ours_speedup``: the provider's time over the CUDA kernel's."""
    if "ms" in row and "ms" in ours:
        row["ours_speedup"] = round(row["ms"] / ours["ms"], 2)
    return row


def topk_rows(cuda):
    for Q, n, k in [(16, 1 << 20, 100), (256, 1 << 18, 1000)]:
        torch.manual_seed(0)
        q, x = torch.randn(Q, 64, device="cuda"), torch.randn(n, 64, device="cuda")
        for provider, fn in [
            ("fastinfluence-cuda", lambda: cuda.score_topk(q, x, k)),
            ("torch-reference", lambda: score_topk_reference(q, x, k)),
        ]:
            yield {
                "kernel": "score_topk",
                "provider": provider,
                "shape": f"Q={Q} n={n} D=64 k={k}",
                **gpu_floors.timing(fn),
            }


def device_checks(cuda) -> dict:
    from fastinfluence.ops.backends import cpu

    if cpu._ext is None:
        return {"bitwise_equal_to_host_twin": "host twin not built"}
    torch.manual_seed(1)
    x = torch.randn(37, 3001)
    return {
        f"bitwise_equal_to_host_twin_{kind}": bool(
            torch.equal(cuda.jl_project(x.cuda(), 517, 3, kind, 0).cpu(), cpu.jl_project(x, 517, 3, kind, 0))
        )
        for kind in ("rademacher", "gaussian")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--floors", help="floors.json of bench/gpu_floors.py (measured here when absent)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    from fastinfluence.ops.backends import cuda

    ok, why = cuda.is_available(torch.device("cuda"))
    if not ok:
        sys.exit(why)
    floors = gpu_floors.load_floors(args.floors) or {}
    if "fp32_flop_per_s" not in floors:
        floors = gpu_floors.measure_floors()
    results = gpu_floors.Results(args.out, "jl_project_gpu", floors=floors)
    with results.section("bitwise checks"):
        results.extra["checks"] = device_checks(cuda)
        print(results.extra["checks"], flush=True)
        results.write()
    parts = [(kind, B, D, k, torch.float32) for kind in ("rademacher", "gaussian") for B, D, k in SHAPES]
    for kind, B, D, k, dtype in parts + [("rademacher", 8, 1 << 22, 4096, torch.bfloat16)]:
        with results.section(f"jl_project B={B} D={D} k={k} {kind} {dtype}"):
            for r in jl_rows(cuda, floors, B, D, k, kind, dtype):
                results.add(r)
        torch.cuda.empty_cache()
    with results.section("score_topk"):
        for r in topk_rows(cuda):
            results.add(r)
    print(results.path)
    if results.errors:
        sys.exit(f"{len(results.errors)} part(s) failed")


if __name__ == "__main__":
    main()
