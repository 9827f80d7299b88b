"""Peak memory and time of linear_cross_entropy: chunked torch path vs materialised logits.

Each (provider, shape) runs in a fresh subprocess: the peak resident set size after the
inputs are allocated (the high-water mark is reset there, so building the inputs does not
count), minus the resident size at that point, is the extra memory the forward + backward
needed (CPU allocations are invisible to torch.cuda statistics).
On a GPU it reports torch.cuda.max_memory_allocated instead.

    python bench/bench_linear_cross_entropy.py             # writes bench/results/linear_cross_entropy_cpu.json
    python bench/bench_linear_cross_entropy.py --quick     # small shapes, prints only
    python bench/bench_linear_cross_entropy.py --realshape # Qwen2-0.5B head, half the tokens labelled:
                                                           # bench/results/linear_cross_entropy_realshape_cpu.json

``--realshape`` (about 2.5 CPU minutes): V = 151,936, H = 896, N = 1,024 tokens in 8 examples
whose first 64 tokens are prompt (ignored) and last 64 answer, float32, frozen head (as in
extraction and LoRA unlearning), one thread, CPU seconds (``time.process_time``) of forward +
backward with signed per-token upstream gradients, median of 3. Providers:

* ``chunked_all_rows_recompute``: the previous op, the chunked reference forward and
  backward called on all 1,024 rows (logits at ignored rows too, recomputed in the backward);
* ``fused``: ``ops.linear_cross_entropy`` now (labelled rows only, no recompute);
* ``fused_all_labelled``: the same with every row labelled (its cost over all positions);
* ``fused_trainable_head``: the same with the head's weight trainable (recompute + dW);
* ``materialised_all_rows`` / ``materialised_labelled_rows``: (rows, V) float32 logits and
  ``F.cross_entropy`` through autograd, over all rows or the gathered labelled rows.
"""

from __future__ import annotations

import argparse
import datetime
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
REALSHAPE = (1024, 896, 151936)
REAL_PROVIDERS = (
    "chunked_all_rows_recompute",
    "fused",
    "fused_all_labelled",
    "fused_trainable_head",
    "materialised_all_rows",
    "materialised_labelled_rows",
)
EXAMPLE, PROMPT = 128, 64  # --realshape: tokens per example, of which the first PROMPT are ignored


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Reset the kernel's resident high-water mark (VmHWM) to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _step(provider: str, hidden, weight, labels, w):
    """One forward + backward of ``provider``; returns nothing, leaves no gradient behind."""
    import torch
    import torch.nn.functional as F

    from fastinfluence.ops import linear_cross_entropy
    from fastinfluence.ops.linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward

    if provider == "chunked_all_rows_recompute":
        with torch.no_grad():
            loss, lse = linear_cross_entropy_forward(hidden, weight, None, labels, -100, None)
            linear_cross_entropy_backward(hidden, weight, None, labels, lse, w, -100, None, False, False)
        return
    if provider in ("chunked", "fused", "fused_all_labelled", "fused_trainable_head"):
        loss = linear_cross_entropy(hidden, weight, labels)
    else:
        x, y, ww = hidden, labels, w
        if provider == "materialised_labelled_rows":
            rows = (labels != -100).nonzero().squeeze(1)
            x, y, ww = hidden[rows], labels[rows], w[rows]
        loss, w = F.cross_entropy((x @ weight.T).float(), y, reduction="none"), ww
    (loss * w).sum().backward()
    hidden.grad = weight.grad = None


def run_one(provider: str, n: int, h: int, v: int, dtype: str, repeats: int, threads: int | None = None) -> dict:
    import torch

    from fastinfluence.ops import set_backend

    if threads:
        torch.set_num_threads(threads)
    set_backend("torch")
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = torch.randn(n, h, dtype=dt, device=device, requires_grad=True)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dt)
    weight.requires_grad_(provider in ("chunked", "materialised", "fused_trainable_head"))
    labels = torch.randint(0, v, (n,), device=device)
    if provider in REAL_PROVIDERS and provider != "fused_all_labelled":
        labels.view(-1, EXAMPLE)[:, :PROMPT] = -100  # prompt tokens carry no loss
    w = torch.randn(n, device=device)  # signed per-token upstream gradient

    times, cpu_times = [], []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        _step(provider, hidden, weight, labels, w)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    return {
        "provider": provider,
        "N": n,
        "labelled": int((labels != -100).sum()),
        "H": h,
        "V": v,
        "dtype": dtype,
        "device": device,
        "threads": torch.get_num_threads(),
        "peak_extra_MiB": round(peak / 2**20, 1),
        "logits_MiB": round(n * v * 4 / 2**20, 1),
        "median_s": round(statistics.median(times), 4),
        "median_cpu_s": round(statistics.median(cpu_times), 3),
        "repeats": repeats,
    }


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return out.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, print only")
    ap.add_argument("--realshape", action="store_true", help="V=151936, H=896, N=1024 with 512 labelled, 1 thread")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one", nargs=4, metavar=("PROVIDER", "N", "H", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        p, n, h, v = args.one
        print(json.dumps(run_one(p, int(n), int(h), int(v), args.dtype, args.repeats, args.threads)))
        return
    if args.realshape:
        runs, threads = [(REALSHAPE, p) for p in REAL_PROVIDERS], 1
    else:
        runs, threads = [(s, p) for s in (QUICK if args.quick else SHAPES) for p in PROVIDERS], args.threads
    rows = []
    for (n, h, v), p in runs:
        cmd = [sys.executable, __file__, "--one", p, str(n), str(h), str(v), "--dtype", args.dtype]
        cmd += ["--repeats", str(args.repeats)] + (["--threads", str(threads)] if threads else [])
        row = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
        print(row, flush=True)
        rows.append(row)
    if args.quick:
        return
    import torch

    name = "linear_cross_entropy_realshape" if args.realshape else "linear_cross_entropy"
    out = Path(__file__).parent / "results" / f"{name}_{rows[0]['device']}.json"
    meta = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "commit": _commit(),
        "date": datetime.date.today().isoformat(),
        "method": "fresh process per row; extra peak RSS over the inputs; median of repeats (median_cpu_s: "
        "time.process_time)",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
