"""Where extraction's peak memory goes at vocabulary 32,000 x 1,024 tokens (the peer benchmark's v32k).

The workload of ``bench/peers`` (``--shape real``, data set ``v32k``): a Qwen2-shaped model
(hidden 896, MLP 4,864, 2 layers, tied head, random weights), 8 train + 2 query random-token
sequences of 1,024 tokens, loss on the last 512, length-bucketed batches of at most
``--max-tokens`` padded tokens; 16 x 16 features of q, k, v, o, gate, up, down of both blocks,
then ``score`` (what ``bench/peers/run_fastinfluence.py proj16`` runs). Cases, each in its own
process, peak RSS (VmHWM, model and data loaded included) and the RSS once loaded:

- ``floor``: the model's own fused loss (labelled rows only) and input-gradient backward on
  the same batches, no hooks, nothing kept: what any tool pays at this batch size;
- ``extract_full_a``: the extraction with each hooked layer's full input A held from its
  forward until its G arrives (as before ``keep_input``);
- ``extract``: the extraction as it is (A P_in formed in the forward, the full A freed there).

    python bench/realshape_memory.py [--reps 1] [--jobs 1] [--max-tokens 2048,1024] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
CASES = ("floor", "extract_full_a", "extract")


def _case(work: str, case: str, max_tokens: int) -> None:
    import torch

    sys.path.insert(0, str(PEERS))
    os.environ["FI_PEER_MAX_TOKENS"] = str(max_tokens)
    import common
    import run_fastinfluence as runner

    import fastinfluence as fi
    from fastinfluence import capture

    torch.set_num_threads(1)
    data = torch.load(Path(work) / "data_v32k.pt")
    model = common.load_model(Path(work))
    loaded = common.rss_mb()
    if case == "floor":
        config = fi.ProjectionConfig(include=runner.INCLUDE, include_bias=False)
        cp = capture.CapturePass(model, config)
        for batch in capture.iter_batches(runner.batched(data["train"]) + runner.batched(data["query"]), cp.device):
            with capture.frozen_for_capture(model, cp.layers), torch.enable_grad():
                capture.forward_losses(model, batch, cp.head).sum().backward()
    else:
        if case == "extract_full_a":
            backward = capture.CapturePass.backward
            capture.CapturePass.backward = lambda self, *a, keep_input=None, **k: backward(self, *a, **k)
        runner.run(model, data, "proj16", Path(tempfile.mkdtemp()) / "scores")
    peak = common.rss_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak, "loaded_rss_mb": loaded}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="case processes run at a time")
    ap.add_argument("--max-tokens", default="2048,1024")
    ap.add_argument("--work", default=None, help="a directory with the v32k model and data (made when missing)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/realshape_memory_32k_cpu.json"))
    ap.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        _case(args.case[0], args.case[1], int(args.case[2]))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="fi_mem_"))
    if not (work / "model").exists():
        sys.path.insert(0, str(PEERS))
        import torch
        from common import build_real_model, real_data

        build_real_model("v32k").save_pretrained(work / "model")
        torch.save(real_data("v32k"), work / "data_v32k.pt")
    budgets = [int(t) for t in args.max_tokens.split(",")]
    runs: dict = {}
    load_start = os.getloadavg()[0]
    # rounds interleave the cases; ``--jobs`` processes at a time (RSS is per process)
    todo = [(case, tokens) for _ in range(args.reps) for tokens in budgets for case in CASES]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        outs = pool.map(
            lambda ct: subprocess.run(
                [sys.executable, __file__, "--case", str(work), ct[0], str(ct[1])],
                capture_output=True,
                text=True,
                check=True,
            ),
            todo,
        )
        for (case, tokens), out in zip(todo, outs):
            runs.setdefault(f"{case}@{tokens}", []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {
        k: {
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in v),
            "loaded_rss_mb": statistics.median(r["loaded_rss_mb"] for r in v),
            "peak_rss_mb_all": [r["peak_rss_mb"] for r in v],
        }
        for k, v in runs.items()
    }
    result = {
        "meta": {
            "workload": "bench/peers v32k: vocabulary 32,000, 8 train + 2 query sequences of 1,024 tokens, loss on "
            "the last 512; Qwen2 widths, 2 layers, tied head; proj16 (16 x 16 per layer) of q,k,v,o,gate,up,down",
            "measure": "peak RSS (VmHWM) of a process per case, model and data loaded included; median of reps",
            "reps": args.reps,
            "threads": 1,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_1min_at_start": load_start,
            "note": "the machine was shared with other jobs (RSS does not depend on CPU load, timings are not kept)",
        },
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
