"""Time every op on each backend available here against the torch reference.

For each op and backend: the median wall time over repeats after a warm-up, the
relative error of its output against the torch reference on the same random inputs,
the op's effective throughput (GFLOP/s of the useful arithmetic), and the backend that
actually ran it (``ran``: a backend that does not cover the inputs falls back to torch,
and ``fallback`` says why). Every op in the registry has a case here. Kernel-level
GPU measurements against physical floors live in ``bench/gpu_suite.sh``; this command
answers "which backend is fastest on this machine, and is it right".

    fastinfluence bench                       # small shapes, every op, every backend here
    fastinfluence bench --size medium --json bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .common import summary

if TYPE_CHECKING:
    import torch

OPS = (
    "project",
    "project_bf16",
    "project_tokens",
    "ghost_dot",
    "ghost_norm",
    "score_topk",
    "jl_project",
    "linear_cross_entropy",
    "linear_cross_entropy_forward_grad",
    "linear_cross_entropy_backward",
)  # the bench cases; every registered op is dispatched by one
SIZES = {
    # project / ghost: B, T, d_in, d_out, k; score: Q, N, D, topk; jl: B, D, k; lce: N, H, V
    "small": dict(
        B=4,
        T=64,
        d_in=256,
        d_out=256,
        k=32,
        Q=16,
        N=4096,
        D=1024,
        topk=10,
        jlB=8,
        jlD=16384,
        jlk=256,
        lN=256,
        lH=128,
        lV=4096,
    ),
    "medium": dict(
        B=8,
        T=256,
        d_in=1024,
        d_out=1024,
        k=64,
        Q=64,
        N=32768,
        D=4096,
        topk=100,
        jlB=16,
        jlD=262144,
        jlk=1024,
        lN=1024,
        lH=512,
        lV=32000,
    ),
}


def _cases(s: dict, device: torch.device) -> dict[str, tuple[Callable[[], tuple], Callable, float]]:
    """op -> (make inputs, call(op_fn, inputs) -> tensor, useful flops)."""
    import torch

    from .. import ops

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    B, T, di, do, k = s["B"], s["T"], s["d_in"], s["d_out"], s["k"]

    def factors():
        """(A, G, P_in, P_out, mask) of the projection ops."""
        return rnd(B, T, di), rnd(B, T, do), rnd(di, k), rnd(do, k), torch.ones(B, T, dtype=torch.bool, device=device)

    return {
        "project": (
            factors,
            lambda x: ops.project(*x),
            2 * B * T * (di * k + do * k + k * k),
        ),
        "project_bf16": (  # bfloat16 factors, as an autocast extraction hands them over
            lambda: (
                rnd(B, T, di).bfloat16(),
                rnd(B, T, do).bfloat16(),
                rnd(di, k),
                rnd(do, k),
                torch.ones(B, T, dtype=torch.bool, device=device),
            ),
            lambda x: ops.project(*x),
            2 * B * T * (di * k + do * k + k * k),
        ),
        "project_tokens": (
            factors,
            lambda x: torch.cat([t.flatten() for t in ops.project_tokens(*x)]),
            2 * B * T * (di * k + do * k),
        ),
        "ghost_dot": (
            lambda: (rnd(B, T, di), rnd(B, T, do), rnd(B, T, di), rnd(B, T, do)),
            lambda x: ops.ghost_dot(*x),
            2 * B * B * T * T * (di + do),
        ),
        "ghost_norm": (
            lambda: (rnd(B, T, di), rnd(B, T, do)),
            lambda x: ops.ghost_norm(*x),
            2 * B * T * T * (di + do),
        ),
        "score_topk": (
            lambda: (rnd(s["Q"], s["D"]), rnd(s["N"], s["D"])),
            lambda x: ops.score_topk(x[0], x[1], s["topk"])[0].values,
            2 * s["Q"] * s["N"] * s["D"],
        ),
        "jl_project": (
            lambda: (rnd(s["jlB"], s["jlD"]),),
            lambda x: ops.jl_project(x[0], s["jlk"], seed=0),
            2 * s["jlB"] * s["jlD"] * s["jlk"],
        ),
        "linear_cross_entropy": (
            lambda: (
                rnd(s["lN"], s["lH"]),
                rnd(s["lV"], s["lH"]),
                torch.randint(0, s["lV"], (s["lN"],), generator=g).to(device),
            ),
            lambda x: ops.linear_cross_entropy(x[0], x[1], x[2]),
            2 * s["lN"] * s["lH"] * s["lV"],
        ),
        "linear_cross_entropy_forward_grad": (  # frozen head: loss and input gradient in the forward
            lambda: (
                rnd(s["lN"], s["lH"]).requires_grad_(),
                rnd(s["lV"], s["lH"]),
                torch.randint(0, s["lV"], (s["lN"],), generator=g).to(device),
            ),
            lambda x: ops.linear_cross_entropy(x[0], x[1], x[2]),
            4 * s["lN"] * s["lH"] * s["lV"],
        ),
        "linear_cross_entropy_backward": (
            lambda: _lce_graph(
                rnd(s["lN"], s["lH"]),
                rnd(s["lV"], s["lH"]),
                torch.randint(0, s["lV"], (s["lN"],), generator=g).to(device),
            ),
            lambda x: torch.autograd.grad(x[0], x[1], retain_graph=True)[0],
            6 * s["lN"] * s["lH"] * s["lV"],  # logits again, dz @ W, and dW (the head is trainable)
        ),
    }


def _lce_graph(hidden, weight, labels) -> tuple:
    """(summed loss, hidden) with the graph kept: the backward case differentiates it again on each call.

    The head is trainable, so the backward recomputes the logits (a frozen head's input
    gradient is formed in the forward: the forward_grad case)."""
    from .. import ops

    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    with ops.use_backend("torch"):  # the forward is not what this case measures
        loss = ops.linear_cross_entropy(hidden, weight, labels, reduction="sum")
    return loss, hidden


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(
    size: str = "small", repeats: int = 5, device: str | None = None, ops_filter: list[str] | None = None
) -> list[dict]:
    """One row per op and per backend that implements what the op dispatches (torch always)."""
    import torch

    from .. import ops
    from ..ops._backend import implements

    unknown = sorted(set(ops_filter or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {', '.join(unknown)} for --ops; choose from {', '.join(OPS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: give cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    rows = []
    for name, (make, call, flops) in _cases(SIZES[size], dev).items():
        if ops_filter and name not in ops_filter:
            continue
        inputs = make()
        with ops.use_backend("torch"), ops.trace() as dispatched:
            ref = call(inputs).double()
        names = {d.op for d in dispatched}
        for backend in ops.available_backends(dev):
            if not any(implements(backend, op, dev) for op in names):
                continue  # it would run the torch reference
            with ops.use_backend(backend):
                with ops.trace() as ran:
                    out = call(inputs)
                err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
                sec = _median_seconds(lambda: call(inputs), repeats, dev)
            fallbacks = [d.fallback for d in ran if d.fallback]
            rows.append(
                {
                    "op": name,
                    "backend": backend,
                    "ran": ",".join(sorted({d.backend for d in ran})),
                    "fallback": fallbacks[0] if fallbacks else None,
                    "device": str(dev),
                    "size": size,
                    "median_s": sec,
                    "gflops": flops / sec / 1e9,
                    "rel_err_vs_torch": err,
                }
            )
    return rows


def case_ops(size: str = "small", device: str = "cpu") -> dict[str, set[str]]:
    """Bench case -> the registered ops it dispatches (on torch)."""
    import torch

    from .. import ops

    out = {}
    for name, (make, call, _) in _cases(SIZES[size], torch.device(device)).items():
        inputs = make()
        with ops.use_backend("torch"), ops.trace() as dispatched:
            call(inputs)
        out[name] = {d.op for d in dispatched}
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help=summary(__doc__),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="problem sizes (default small)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per op and backend; the median is reported (default 5)"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"only these ops, of {', '.join(OPS)} (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import torch

    rows = run(args.size, args.repeats, args.device, args.ops)
    print(f"{'op':<31s}{'backend':<9s}{'ran':<10s}{'median ms':>11s}{'GFLOP/s':>10s}{'rel err':>10s}")
    for r in rows:
        print(
            f"{r['op']:<31s}{r['backend']:<9s}{r['ran']:<10s}{r['median_s'] * 1e3:>11.2f}{r['gflops']:>10.2f}"
            f"{r['rel_err_vs_torch']:>10.1e}"
        )
    for r in rows:
        if r["fallback"]:
            print(f"{r['op']} on {r['backend']} ran on {r['ran']}: {r['fallback']}")
    if args.json:
        import platform
        import subprocess

        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "commit": git.stdout.strip() if git.returncode == 0 else None,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0
