"""Where the CPU time of the peer benchmark's fastinfluence runs goes, and the FLOP floor.

Runs the code path of ``bench/peers/run_fastinfluence.py`` on the fixed-length set (tiny
Llama 256-d, 4 layers, vocab 512, eager attention; 512 train + 64 query x 64 tokens; the 28
attention and MLP Linear layers; batches of 32; one thread) and breaks its CPU seconds into:

- ``forward``: the model's forward with the graph started where extraction starts it;
- ``backward``: the input-gradient backward on top (no hooks);
- ``hooks_projection``: extraction minus forward and backward (hooks, projection, rows);
- ``score``: ``fastinfluence.score`` on the features;
- ``exact_scoring``: ``exact_scores`` minus forward and backward (ghost / dense products);
- ``import_model_load``: importing the package and loading the model (outside the peer timing).

Each part is a median of interleaved runs in CPU seconds (process time). The FLOP count of
forward + input-gradient backward of this model and batch is the floor every tool shares.
An op-level profile (torch.profiler, self CPU time) of one extraction and one exact run is
recorded too.

    python bench/profile_peer_path.py [--reps 3] [--out bench/results/profile_peer_path_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

t_import = time.process_time()
import torch  # noqa: E402

import fastinfluence as fi  # noqa: E402
from fastinfluence.batching import iter_batches  # noqa: E402
from fastinfluence.capture import frozen_for_capture, select_layers  # noqa: E402
from fastinfluence.lm import fused_head  # noqa: E402

IMPORT_S = time.process_time() - t_import

from _common import commit  # noqa: E402
from common import MODEL, batches, build_model, datasets  # noqa: E402

INCLUDE = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]


def cpu(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def flops(n_examples: int, T: int) -> dict:
    """Multiply-adds x 2 of the forward and of the input-gradient backward (no weight gradients)."""
    H, I, V, L = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["vocab_size"], MODEL["num_hidden_layers"]
    tokens = n_examples * T
    linear = L * (4 * H * H + 3 * H * I)  # q k v o, gate up down
    attention = L * 2 * T * H  # QK^T and PV, per token (full T x T, eager)
    head = H * V
    fwd = 2 * tokens * (linear + attention + head)
    # Input-gradient backward: every matmul once more (dX = dY W), except the three of block 0's
    # q/k/v whose input gradient nobody needs; attention's backward is two products per one forward.
    bwd = 2 * tokens * (linear - 3 * H * H + 2 * attention + head)
    # Exact scores, dense per layer: every example's gradient G_i^T A_i formed once (T P each), then
    # the (Q, P) x (P, N) product over the P = sum d_in d_out captured weights.
    Q, N = 64, n_examples - 64
    exact = 2 * n_examples * T * linear + 2 * Q * N * linear
    return {
        "forward_gflop": fwd / 1e9,
        "input_grad_backward_gflop": bwd / 1e9,
        "exact_dense_scoring_gflop": exact / 1e9,
        "tokens": tokens,
        "captured_weights": linear,
    }


def matmul_gflops(dtype: torch.dtype, m: int = 2048, k: int = 256, n: int = 512, reps: int = 20) -> float:
    """Single-thread GEMM throughput at the model's shapes: the ceiling for its forward and backward."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.process_time()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.process_time() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results/profile_peer_path_cpu.json"))
    ap.add_argument("--no-profiler", action="store_true", help="skip the op-level torch.profiler tables")
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.process_time()
    model = build_model(0)
    model_s = time.process_time() - t0
    data = datasets()["fixed"]
    train, query = batches(data["train"], 32), batches(data["query"], 32)
    everything = train + query
    config16 = fi.ProjectionConfig(rank_in=16, rank_out=16, include=INCLUDE)
    layers = select_layers(model, INCLUDE)

    from fastinfluence.capture import forward_losses

    def forward_only():
        with frozen_for_capture(model, layers):
            for b in iter_batches(everything, torch.device("cpu"), model):
                with torch.enable_grad():
                    forward_losses(model, b, fused_head(model))

    def forward_backward():
        with frozen_for_capture(model, layers):
            for b in iter_batches(everything, torch.device("cpu"), model):
                with torch.enable_grad():
                    forward_losses(model, b, fused_head(model)).sum().backward()

    def extract16():
        ext = fi.GradientExtractor(model, config16)
        return ext.extract(train), ext.extract(query)

    def forward_backward_bf16():
        with frozen_for_capture(model, layers):
            for b in iter_batches(everything, torch.device("cpu"), model):
                with torch.enable_grad():
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = forward_losses(model, b, fused_head(model)).sum()
                    loss.backward()

    def extract16_bf16():
        ext = fi.GradientExtractor(model, dataclasses.replace(config16, autocast="bfloat16"))
        return ext.extract(train), ext.extract(query)

    feats = {}

    def extract_and_keep():
        feats["tr"], feats["q"] = extract16()

    def score16():
        return fi.score(feats["q"], feats["tr"], metric="dot", topk=None, aggregates=())

    def exact():
        return fi.exact_scores(model, query, train, config=fi.ProjectionConfig(include=INCLUDE), metric="dot")

    extract_and_keep()
    fns = {
        "forward": forward_only,
        "forward_backward": forward_backward,
        "extract16": extract16,
        "forward_backward_bf16": forward_backward_bf16,
        "extract16_bf16": extract16_bf16,
        "score16": score16,
        "exact": exact,
    }
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            times[k].append(cpu(fn, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    f = flops(len(everything) * 32, 64)
    fwd, fb = med["forward"], med["forward_backward"]
    breakdown = {
        "fixed_proj16": {
            "forward": fwd,
            "backward": fb - fwd,
            "hooks_projection_rows": med["extract16"] - fb,
            "score": med["score16"],
            "total_build_score": med["extract16"] + med["score16"],
        },
        "fixed_proj16_autocast_bf16": {
            "forward_backward": med["forward_backward_bf16"],
            "hooks_projection_rows": med["extract16_bf16"] - med["forward_backward_bf16"],
            "total_build_score": med["extract16_bf16"] + med["score16"],
        },
        "exact": {
            "forward": fwd,
            "backward": fb - fwd,
            "exact_scoring_and_hooks": med["exact"] - fb,
            "total": med["exact"],
        },
        "import_s": IMPORT_S,
        "model_build_s": model_s,
    }
    gflop = f["forward_gflop"] + f["input_grad_backward_gflop"]
    peak = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    floor = {k: gflop / v for k, v in peak.items()}
    floor["exact_float32"] = (gflop + f["exact_dense_scoring_gflop"]) / peak["float32"]
    record = {
        "what": "CPU-time breakdown of the peer benchmark's fastinfluence path (fixed set, 1 thread)",
        "model": MODEL,
        "attention": "eager",
        "data": "512 train + 64 query x 64 tokens, batch 32, 28 attention/MLP Linear layers",
        "reps": args.reps,
        "median_cpu_s": med,
        "all_cpu_s": times,
        "breakdown_cpu_s": breakdown,
        "flops": f,
        "forward_gflops_achieved": f["forward_gflop"] / fwd,
        "forward_backward_gflops_achieved": gflop / fb,
        "matmul_gflops_1thread": peak,
        "forward_backward_floor_s_at_matmul_peak": floor,
        "commit": commit(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg": os.getloadavg(),
        },
    }
    if not args.no_profiler:
        from torch.profiler import ProfilerActivity, profile

        tables = {}
        for name, fn in (("extract16", extract16), ("exact", exact)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            ev = prof.key_averages()
            rows = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
            tables[name] = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows]
        record["profiler_top_self_cpu"] = tables
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("median_cpu_s", "breakdown_cpu_s", "flops")}, indent=1))
    print("GFLOP/s: forward", record["forward_gflops_achieved"], "fwd+bwd", record["forward_backward_gflops_achieved"])


if __name__ == "__main__":
    main()
