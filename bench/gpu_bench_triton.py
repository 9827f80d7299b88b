"""Times every Triton kernel at real-model sizes against the torch paths and its floor.

Each row: median milliseconds (CUDA events, L2 flushed before each call; under 0.2 ms also
``kernel_ms``, the kernels' own device time without launch overhead), the floor (bytes over
the measured copy bandwidth, or FLOPs over the measured bf16 matmul rate, whichever is
larger), the percentage of the floor reached, and the triton version. A kernel that fails
leaves an ``error`` row and the others still run; the JSON is rewritten after every row.
Goals (measured, not asserted):

* project at Llama-3-8B MLP shapes, T=2048, k=64: >= 80% of copy bandwidth on A and G;
* score_topk: >= 80% of copy bandwidth for Q <= 64, >= 60% of the bf16 rate for Q >= 1024;
* linear_cross_entropy at V=128256, H=4096, N=8192: <= 1/8 of the materialised path's
  peak memory and <= 1.1x its time.

Usage: python bench/gpu_bench_triton.py --out DIR [--floors DIR/floors.json] [--quick]
(--floors: reuse the floors bench/gpu_floors.py measured; --quick: tiny shapes, runs on the
CPU under TRITON_INTERPRET=1 to check the script itself).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_floors  # noqa: E402

from fastinfluence import triton_kernels as tk  # noqa: E402
from fastinfluence.ops.ghost import ghost_dot_reference, ghost_norm_reference  # noqa: E402
from fastinfluence.ops.linear_cross_entropy import (
    linear_cross_entropy_backward as torch_backward,
)  # noqa: E402
from fastinfluence.ops.linear_cross_entropy import (
    linear_cross_entropy_forward as torch_forward,
)
from fastinfluence.ops.project import project_reference  # noqa: E402
from fastinfluence.ops.score_topk import score_topk_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BF16 = torch.bfloat16


def timed(fn) -> dict:
    """``gpu_floors.timing`` on a GPU; one wall-clock call on the CPU (--quick checks the script only)."""
    if CUDA:
        return gpu_floors.timing(fn)
    start = time.perf_counter()
    fn()
    return {"ms": round((time.perf_counter() - start) * 1e3, 5)}


def peak_bytes(fn) -> int:
    """Device memory ``fn`` allocates at its peak beyond what was allocated before it."""
    if not CUDA:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def row(kernel, shape, provider, t: dict, floor_ms=None, goal=None, **extra) -> dict:
    """One result row from a ``timed`` dict; the percentage of the floor uses the kernel-only time when there is one."""
    r = {"kernel": kernel, "shape": shape, "provider": provider, **t}
    if floor_ms is not None:
        r["floor_ms"] = round(floor_ms, 5)
        r["pct_of_floor"] = round(100 * floor_ms / t["ms"], 1)
        if t.get("kernel_ms"):
            r["pct_of_floor_kernel_only"] = round(100 * floor_ms / t["kernel_ms"], 1)
    if goal is not None:
        r["goal"] = goal
    r.update(extra)
    return r


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| of the kernel against the torch path, as a check of the tuned config."""
    out, ref = out.double(), ref.double()
    return round(((out - ref).norm() / ref.norm()).item(), 6)


def floor_ms(floors, nbytes=0, flops=0) -> float:
    return 1e3 * max(nbytes / floors["copy_bytes_per_s"], flops / floors["bf16_flop_per_s"])


def rand(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def autotuned(module: str, kernel: str) -> dict:
    """Best config and per-config median ms of ``fastinfluence.triton_kernels.<module>.<kernel>``
    for its last autotuned shape (read right after the first call at a new shape)."""
    tuner = getattr(importlib.import_module(f"fastinfluence.triton_kernels.{module}"), kernel)
    timings = getattr(tuner, "configs_timings", None) or {}
    return {
        "config": str(getattr(tuner, "best_config", "")),
        "config_ms": {str(c): round(float(t[0] if isinstance(t, (list, tuple)) else t), 4) for c, t in timings.items()},
    }


def bench_project(floors, quick):
    B, T, k = (2, 40, 16) if quick else (4, 2048, 64)
    widths = [(48, 80)] if quick else [(4096, 14336), (14336, 4096), (4096, 4096)]
    for d_in, d_out in widths:
        A, G = rand(B, T, d_in), rand(B, T, d_out)
        P_in, P_out = (
            rand(d_in, k, dtype=torch.float32, scale=k**-0.5),
            rand(d_out, k, dtype=torch.float32, scale=k**-0.5),
        )
        shape = f"B={B} T={T} d_in={d_in} d_out={d_out} k={k} bf16"
        floor = floor_ms(floors, nbytes=A.nbytes + G.nbytes)
        P_in16, P_out16 = P_in.to(BF16), P_out.to(BF16)
        ms = timed(lambda: tk.project(A, G, P_in, P_out))
        err = rel_err(tk.project(A, G, P_in, P_out), project_reference(A, G, P_in, P_out))
        yield row(
            "project",
            shape,
            "triton",
            ms,
            floor,
            ">= 80% of copy bandwidth",
            rel_err=err,
            **autotuned("project", "_project_kernel"),
        )
        yield row(
            "project",
            shape,
            "torch bf16 matmuls",
            timed(lambda: (G @ P_out16).float().transpose(1, 2) @ (A @ P_in16).float()),
            floor,
        )
        yield row(
            "project", shape, "torch reference (fp32)", timed(lambda: project_reference(A, G, P_in, P_out)), floor
        )
        out_bytes = B * T * 2 * k * 2
        ms = timed(lambda: tk.project_tokens(A, G, P_in, P_out, None, BF16))
        yield row(
            "project_tokens", shape + " -> bf16", "triton", ms, floor_ms(floors, nbytes=A.nbytes + G.nbytes + out_bytes)
        )
        A = G = None  # free the inputs before the next width


def bench_ghost(floors, quick):
    B, T, d = (2, 20, 40) if quick else (8, 256, 4096)
    A1, G1, A2, G2 = rand(B, T, d), rand(B, T, d), rand(B, T, d), rand(B, T, d)
    shape = f"B1=B2={B} T={T} d_in=d_out={d} bf16"
    floor = floor_ms(floors, nbytes=2 * (A1.nbytes + G1.nbytes), flops=2 * B * B * T * T * 2 * d)
    err = rel_err(tk.ghost_dot(A1, G1, A2, G2), ghost_dot_reference(A1, G1, A2, G2))
    yield row("ghost_dot", shape, "triton", timed(lambda: tk.ghost_dot(A1, G1, A2, G2)), floor, rel_err=err)
    yield row("ghost_dot", shape, "torch reference", timed(lambda: ghost_dot_reference(A1, G1, A2, G2)), floor)
    floor = floor_ms(floors, nbytes=A1.nbytes + G1.nbytes, flops=2 * B * T * T * 2 * d)
    yield row("ghost_norm", shape, "triton", timed(lambda: tk.ghost_norm(A1, G1)), floor)
    yield row("ghost_norm", shape, "torch reference", timed(lambda: ghost_norm_reference(A1, G1)), floor)


def bench_score_topk(floors, quick):
    # D = 32768: eight 64x64 layers, a small store row; a 1 GiB bf16 chunk.
    n, D, k = (40, 48, 8) if quick else (16384, 32768, 100)
    train = rand(n, D)
    train_scale = 1 / train.float().norm(dim=1)
    for Q in [16, 64] if quick else [16, 64, 1024, 2048]:
        query = rand(Q, D)
        query_scale = 1 / query.float().norm(dim=1)
        shape = f"Q={Q} n={n} D={D} k={k} bf16 cosine"
        floor = floor_ms(floors, nbytes=train.nbytes + query.nbytes, flops=2 * Q * n * D)
        goal = ">= 80% of copy bandwidth" if Q <= 64 else ">= 60% of bf16 matmul rate"
        ms = timed(lambda: tk.score_topk(query, train, k, query_scale, train_scale))
        (top, agg), (ref_top, ref_agg) = (
            f(query, train, k, query_scale, train_scale) for f in (tk.score_topk, score_topk_reference)
        )
        err = max(rel_err(top.values, ref_top.values), rel_err(agg, ref_agg))
        yield row(
            "score_topk", shape, "triton", ms, floor, goal, rel_err=err, **autotuned("score_topk", "_score_kernel")
        )
        yield row(
            "score_topk",
            shape,
            "torch reference",
            timed(lambda: score_topk_reference(query, train, k, query_scale, train_scale)),
            floor,
        )


def _lce_inputs(N, H, V):
    hidden = rand(N, H)
    weight = rand(V, H, scale=H**-0.5)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < 0.1] = -100
    grad_loss = torch.randn(N, device=DEVICE)
    return hidden, weight, labels, grad_loss


def _lce_fused(fwd, bwd, hidden, weight, labels, grad_loss):
    def run():
        _, lse = fwd(hidden, weight, None, labels, -100, None)
        return bwd(hidden, weight, None, labels, lse, grad_loss, -100, None, True, False)[:2]

    return run


def _lce_materialised(hidden, weight, labels, grad_loss):
    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="none")
        (loss * grad_loss).sum().backward()
        return h.grad, w.grad

    return run


def bench_linear_cross_entropy(floors, quick):
    N, H, V = (24, 32, 300) if quick else (8192, 4096, 128256)
    inputs = _lce_inputs(N, H, V)
    shape = f"N={N} H={H} V={V} bf16 fwd+bwd"
    flops = 3 * 2 * N * H * V
    providers = {
        "materialised logits (torch)": _lce_materialised(*inputs),
        "triton": _lce_fused(tk.linear_cross_entropy_forward, tk.linear_cross_entropy_backward, *inputs),
        "torch chunked": _lce_fused(torch_forward, torch_backward, *inputs),
    }
    grad_ref = providers["materialised logits (torch)"]()
    ref = None
    for name, fn in providers.items():
        mem = peak_bytes(fn)
        grads = fn()
        err = max(rel_err(grads[0], grad_ref[0]), rel_err(grads[1], grad_ref[1]))
        r = row(
            "linear_cross_entropy",
            shape,
            name,
            timed(fn),
            floor_ms(floors, flops=flops),
            peak_mem_mb=round(mem / 2**20, 1),
            grad_rel_err=err,
        )
        if ref is None:
            ref = r
        else:
            r["time_vs_materialised"] = round(r["ms"] / ref["ms"], 3)
            r["mem_vs_materialised"] = round(r["peak_mem_mb"] / ref["peak_mem_mb"], 4) if ref["peak_mem_mb"] else None
        if name == "triton":
            r["goal"] = "<= 1/8 of materialised peak memory, <= 1.1x its time"
        grads = None
        yield r


BENCHES = (bench_project, bench_ghost, bench_score_topk, bench_linear_cross_entropy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for triton_kernels.json")
    parser.add_argument("--floors", help="floors.json of bench/gpu_floors.py (measured here when absent)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the script, times nothing useful)")
    parser.add_argument("--only", default="", help="comma-separated bench names (project, ghost, score_topk, ...)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if CUDA:
        floors = gpu_floors.load_floors(args.floors) or gpu_floors.measure_floors()
    else:
        floors = {"copy_bytes_per_s": 1e10, "bf16_flop_per_s": 1e11}  # placeholders for --quick on the CPU
    results = gpu_floors.Results(args.out, "triton_kernels", floors=floors, quick=args.quick)
    only = {name for name in args.only.split(",") if name}
    for bench in BENCHES:
        name = bench.__name__.removeprefix("bench_")
        if only and name not in only:
            continue
        with results.section(name):  # one failing kernel leaves an error row; the others still run
            for r in bench(floors, args.quick):
                results.add(r)
        if CUDA:
            torch.cuda.empty_cache()
    print(results.path)
    if results.errors:
        failures = "; ".join(f"{e['section']}: {e['error']}" for e in results.errors)
        sys.exit(f"{len(results.errors)} bench(es) failed: {failures}")


if __name__ == "__main__":
    main()
