"""CUDA ``project`` (csrc/project.cu, WMMA) against the Triton kernel and the torch reference.

Shapes: the Linear layers of Llama-3-8B (d = 4096 / 14336), B=4, T=2048, k=64, bfloat16
(and float32 on one shape). Each row: median ms (CUDA events, L2 flushed before each call),
its error against the float32 torch reference, the percentage of the measured copy
bandwidth reached on the bytes of A and G, and the triton version. A shape that fails
leaves an ``error`` row and the next one runs; the JSON is rewritten after every row.
Goal (measured, not asserted): >= 80% of copy bandwidth; the CUDA kernel is kept in
``auto`` only if it beats the Triton kernel here.

Usage: python bench/gpu_project_cuda.py --out DIR [--floors DIR/floors.json]
(writes DIR/project_cuda.json)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_floors  # noqa: E402

from fastinfluence.ops.project import project_reference  # noqa: E402

B, T, K = 4, 2048, 64
WIDTHS = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return round(((out - ref).norm() / ref.norm()).item(), 6)


def providers(cuda) -> dict:
    """Name -> project function; a string says why a provider is missing."""
    found = {"cuda (wmma)": cuda.project}
    try:
        from fastinfluence import triton_kernels

        found["triton"] = triton_kernels.project
    except Exception as exc:  # triton missing or broken on this machine
        found["triton"] = f"unavailable: {type(exc).__name__}: {exc}"
    found["torch reference"] = project_reference
    return found


def shape_rows(fns: dict, d_in: int, d_out: int, dtype: torch.dtype, copy_bw: float, masked: bool):
    torch.manual_seed(0)
    A = torch.randn(B, T, d_in, device="cuda").to(dtype)
    G = torch.randn(B, T, d_out, device="cuda").to(dtype)
    P_in = torch.randn(d_in, K, device="cuda") * K**-0.5
    P_out = torch.randn(d_out, K, device="cuda") * K**-0.5
    mask = torch.rand(B, T, device="cuda") > 0.1 if masked else None
    floor_ms = 1e3 * (A.nbytes + G.nbytes) / copy_bw
    ref = project_reference(A, G, P_in, P_out, mask)
    shape = f"B={B} T={T} d_in={d_in} d_out={d_out} k={K} {str(dtype).replace('torch.', '')}" + (
        " mask" if masked else ""
    )
    timed = {}
    for name, fn in fns.items():
        row = {"kernel": "project", "shape": shape, "provider": name}
        if isinstance(fn, str):
            row["note"] = fn
        else:
            t = gpu_floors.timing(lambda: fn(A, G, P_in, P_out, mask))
            timed[name] = t["ms"]
            row |= {
                **t,
                "floor_ms": round(floor_ms, 4),
                "pct_of_floor": round(100 * floor_ms / t["ms"], 1),
                "rel_err": rel_err(fn(A, G, P_in, P_out, mask), ref),
                "goal": ">= 80% of copy bandwidth",
            }
            if name == "triton" and "cuda (wmma)" in timed:
                row["cuda_speedup_vs_triton"] = round(t["ms"] / timed["cuda (wmma)"], 3)
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for project_cuda.json")
    parser.add_argument("--floors", help="floors.json of bench/gpu_floors.py (else the copy bandwidth is measured)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    from fastinfluence.ops.backends import cuda

    ok, why = cuda.is_available(torch.device("cuda"))
    if not ok:
        sys.exit(why)
    copy_bw = (gpu_floors.load_floors(args.floors) or {}).get("copy_bytes_per_s") or gpu_floors.copy_bandwidth()
    fns = providers(cuda)
    results = gpu_floors.Results(args.out, "project_cuda", floors={"copy_bytes_per_s": copy_bw})
    cases = [(d_in, d_out, torch.bfloat16, False) for d_in, d_out in WIDTHS]
    cases += [(4096, 14336, torch.bfloat16, True), (4096, 14336, torch.float32, False)]
    for d_in, d_out, dtype, masked in cases:
        with results.section(f"project d_in={d_in} d_out={d_out} {dtype}{' mask' if masked else ''}"):
            for r in shape_rows(fns, d_in, d_out, dtype, copy_bw, masked):
                results.add(r)
        torch.cuda.empty_cache()
    print(results.path)
    if results.errors:
        sys.exit(f"{len(results.errors)} shape(s) failed")


if __name__ == "__main__":
    main()
