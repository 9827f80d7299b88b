"""Peak memory, time and saved size of a full-dimension EK-FAC fit at a real model's widths.

A Qwen2-0.5B-shaped model (hidden 896, MLP 4,864, 14 query and 2 key/value heads) cut to a few
layers and a small vocabulary, float32, every Linear of its blocks captured (the head is tied, so
not captured): the widest factors are 4,864 x 4,864. Each row runs in a fresh process and
reports its peak resident set size over what it held before the fit (the model and the batch),
from the kernel's high-water mark (reset before the fit). ``--baseline COMMIT`` adds a row for
the package as it was at that commit (extracted into a temporary directory), with float64
factors, the only kind it had.

    python bench/ekfac_memory.py [--layers 2] [--examples 4] [--seq 32] [--baseline 29056a0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import commit

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import fastinfluence
    from fastinfluence import fit_kfac

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=896,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.examples, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    kwargs = {} if args.factor_dtype == "baseline" else {"factor_dtype": args.factor_dtype}
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    base = _rss_bytes()
    t0 = time.perf_counter()
    factors = fit_kfac(model, [batch], method="ekfac", **kwargs)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes() - base
    held = sum(v.numel() * v.element_size() for v in factors.stats.values())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "factors.safetensors"
        factors.save(path)
        saved = path.stat().st_size
    row = {
        "code": "baseline" if args.factor_dtype == "baseline" else "this commit",
        "factor_dtype": "float64" if args.factor_dtype == "baseline" else args.factor_dtype,
        "peak_extra_MiB": round(peak / 2**20, 1),
        "factors_MiB": round(held / 2**20, 1),
        "saved_MiB": round(saved / 2**20, 1),
        "seconds": round(seconds, 1),
        "package": str(Path(fastinfluence.__file__).parent.relative_to(Path(fastinfluence.__file__).parents[1])),
    }
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=4864, help="MLP width (Qwen2-0.5B: 4,864)")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="a commit to measure as well (its float64 factors)")
    ap.add_argument("--dtypes", default="float64,bfloat16")
    ap.add_argument("--factor-dtype", dest="factor_dtype", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench/results/ekfac_memory_cpu.json"))
    args = ap.parse_args()
    if args.factor_dtype:
        return child(args)
    shape = [
        "--layers",
        str(args.layers),
        "--intermediate",
        str(args.intermediate),
        "--examples",
        str(args.examples),
        "--seq",
        str(args.seq),
    ]
    shape += ["--vocab", str(args.vocab), "--threads", str(args.threads)]
    runs = [(dtype, None) for dtype in args.dtypes.split(",")]
    with tempfile.TemporaryDirectory() as old:
        if args.baseline:
            archive = subprocess.run(
                ["git", "archive", args.baseline, "fastinfluence"], cwd=ROOT, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
            runs.insert(0, ("baseline", old))
        # The rows run side by side (each in its own process, so each peak is its own): a 4,864-wide
        # float64 eigendecomposition takes minutes on a shared CPU.
        procs = []
        for dtype, source in runs:
            env = dict(os.environ)
            if source:  # the old package first on the path
                env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
            cmd = [sys.executable, __file__, "--factor-dtype", dtype, *shape]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT / "bench"))
        rows = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"a row failed (exit {proc.returncode})")
            rows.append(json.loads(out.strip().splitlines()[-1]))
            rows[-1].pop("package")
            print(rows[-1], flush=True)
    result = {
        "benchmark": "ekfac_memory",
        "model": {
            "arch": "qwen2",
            "hidden": 896,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "vocab": args.vocab,
        },
        "examples": args.examples,
        "seq": args.seq,
        "baseline_commit": args.baseline,
        "commit": commit(),
        "threads": args.threads,
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "method": "fresh process per row, the rows side by side; peak RSS (VmHWM, reset before the fit) over the RSS "
        "before it; one run each (memory is deterministic; the seconds are from a 2-core CPU shared with other jobs "
        "and with the other rows: indicative only)",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
