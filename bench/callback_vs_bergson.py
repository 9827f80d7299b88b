"""Training-time collection, ours against Bergson's, in the same run.

``InfluenceCallback`` (this venv) and Bergson's ``GradientCollectorCallback`` (``.peers/bergson``,
``make bench-peers`` creates it) each train the CPU bench model (Llama 256-d, 4 layers, vocab 4096,
batch 8 x 128 tokens, AdamW, 1 thread) with and without their callback, on the same 28 decoder
Linear layers at 16 x 16 per layer. Each process times its own runs (per-step process CPU time,
the first step of a run dropped) alternating with and without; the two tools' processes
alternate ``--rounds`` times, so machine load falls on both. The overhead of each is the median
step with its callback over the median step without, within its own process.

    python bench/callback_vs_bergson.py [--rounds 3] [--out bench/results/callback_vs_bergson_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAYERS = r"self_attn\.(q|k|v|o)_proj$|mlp\.(gate|up|down)_proj$"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="with/without pairs per process")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bergson-python", default=str(ROOT / ".peers/bergson/bin/python"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/callback_vs_bergson_cpu.json"))
    args = ap.parse_args()
    if not Path(args.bergson_python).exists():
        sys.exit(f"no Bergson virtualenv at {args.bergson_python}: run `bash bench/peers/setup.sh` first")
    common = ["--reps", str(args.reps), "--steps", str(args.steps)]
    tools = ("fastinfluence", "bergson", "bergson_plain")
    steps = {t: {"without": [], "with": []} for t in tools}
    load_start = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = tools if r % 2 == 0 else tools[::-1]
            for tool in order:
                out = Path(tmp) / f"{tool}-{r}.json"
                if tool == "fastinfluence":
                    cmd = [sys.executable, str(HERE / "train_callback_overhead.py"), "--include", LAYERS]
                    cmd += common + ["--out", str(out)]
                else:
                    cmd = [args.bergson_python, str(HERE / "peers/callback_bergson.py"), str(out)] + common
                    cmd += ["--no-optimizer-state"] if tool == "bergson_plain" else []
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{tool} run failed:\n{proc.stderr[-3000:]}")
                res = json.loads(out.read_text())
                print(f"[round {r}] {tool}: {res['step_cpu_s_without']:.3f} -> {res['step_cpu_s_with']:.3f} CPU s/step")
                if tool == "fastinfluence":
                    steps[tool]["without"].append(res["step_cpu_s_without"])
                    steps[tool]["with"].append(res["step_cpu_s_with"])
                else:
                    steps[tool]["without"] += res["steps_without"]
                    steps[tool]["with"] += res["steps_with"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = {
        "bench": "callback_vs_bergson",
        "commit": commit.stdout.strip(),
        "model": "Llama hidden 256, 4 layers, 8 heads (4 kv), vocab 4096; batch 8 x 128 tokens; AdamW lr 1e-4",
        "layers": "q, k, v, o, gate, up, down of every block (28), no LM head",
        "projection": "16 x 16 per layer",
        "tools": {
            "fastinfluence": "InfluenceCallback(ProjectionConfig(rank_in=16, rank_out=16, include=28 layers)), "
            "float32 rows, no normaliser",
            "bergson": "GradientCollectorCallback(projection_dim=16) defaults: fp16 store, Adam second-moment "
            "normaliser, lr-scaled; prepare_for_gradient_collection(trainer)",
            "bergson_plain": "the same with use_optimizer_state=False: plain projected gradients, as ours",
        },
        "timer": "process CPU time per optimizer step, 1 thread; fastinfluence: median per process run, "
        "bergson: every step",
        "rounds": args.rounds,
        "load_average_1min_at_start": load_start,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    for tool, s in steps.items():
        base, with_cb = statistics.median(s["without"]), statistics.median(s["with"])
        result[tool] = {"step_cpu_s_without": base, "step_cpu_s_with": with_cb, "overhead": with_cb / base - 1}
    print(json.dumps({k: result[k] for k in tools}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
