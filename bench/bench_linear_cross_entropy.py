"""Peak memory and time of linear_cross_entropy: chunked torch path vs materialised logits.

Each (provider, shape) runs in a fresh subprocess: the peak resident set size after the
inputs are allocated, minus the resident size at that point, is the extra memory the
forward + backward needed (CPU allocations are invisible to torch.cuda statistics).
On a GPU it reports torch.cuda.max_memory_allocated instead.

    python bench/bench_linear_cross_entropy.py            # writes bench/results/linear_cross_entropy_cpu.json
    python bench/bench_linear_cross_entropy.py --quick    # small shapes, prints only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [  # (tokens N, hidden H, vocab V): Llama-2-7B-like vocab and Llama-3-like vocab
    (2048, 1024, 32000),
    (1024, 512, 128256),
]
QUICK = [(256, 64, 4000)]
PROVIDERS = ("materialised", "chunked")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(provider: str, n: int, h: int, v: int, dtype: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from fastinfluence.ops import linear_cross_entropy, set_backend

    set_backend("torch")
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = torch.randn(n, h, dtype=dt, device=device, requires_grad=True)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dt).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    w = torch.randn(n, device=device)  # signed per-token upstream gradient

    def step():
        if provider == "chunked":
            loss = linear_cross_entropy(hidden, weight, labels)
        else:
            loss = F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none")
        (loss * w).sum().backward()
        hidden.grad = weight.grad = None

    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "provider": provider,
        "N": n,
        "H": h,
        "V": v,
        "dtype": dtype,
        "device": device,
        "peak_extra_MiB": round(peak / 2**20, 1),
        "logits_MiB": round(n * v * 4 / 2**20, 1),
        "median_s": round(statistics.median(times), 4),
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, print only")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=4, metavar=("PROVIDER", "N", "H", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        p, n, h, v = args.one
        print(json.dumps(run_one(p, int(n), int(h), int(v), args.dtype, args.repeats)))
        return
    rows = []
    for n, h, v in QUICK if args.quick else SHAPES:
        for p in PROVIDERS:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                p,
                str(n),
                str(h),
                str(v),
                "--dtype",
                args.dtype,
                "--repeats",
                str(args.repeats),
            ]
            row = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
            print(row, flush=True)
            rows.append(row)
    if not args.quick:
        import torch

        out = Path(__file__).parent / "results" / f"linear_cross_entropy_{rows[0]['device']}.json"
        meta = {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "method": "fresh process per row; extra peak RSS over the inputs",
        }
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
