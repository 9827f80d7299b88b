"""Extraction at a real vocabulary and context against the model's own forward + input-gradient backward.

The workload of the real-shape peer comparison: a Qwen2-0.5B-shaped model (vocabulary 151,936,
hidden 896, MLP 4,864, 14 / 2 heads, tied head) cut to 2 decoder layers, random weights, 512-token
sequences whose last 256 tokens are the answer (instruction data: the prompt is half the tokens).
``--workload v32k`` takes a 32,000 vocabulary and 1,024-token sequences (the last 512 the answer).

Cases, each in its own process (CPU seconds on one thread, peak RSS above the loaded model):

- ``model``: the floor every tool pays, the model's own loss (logits at every position) and the
  backward of the input gradient (weights frozen, graph from the embeddings' output);
- ``extract``: ``GradientExtractor`` with 16 x 16 features of every attention and MLP Linear;
- ``extract_head``: the same plus the LM head (tied: its share of the tied weight's gradient).

``--layers 1 --untied``: one decoder layer and an untied head (its own weight, captured whole).

    python bench/realshape_extract.py [--workload qwen2|v32k] [--layers N] [--untied] [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = {
    "qwen2": dict(vocab=151936, seq=512, answer=256),
    "v32k": dict(vocab=32000, seq=1024, answer=512),
}
BLOCKS = [r"layers\.\d+\.(self_attn|mlp)\."]
CASES = ("model", "extract", "extract_head")


def _model(vocab: int, layers: int = 2, untied: bool = False):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=not untied,
    )
    return Qwen2ForCausalLM(config).eval()


def _batches(vocab: int, seq: int, answer: int, examples: int, batch: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(examples // batch):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq - answer] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _settle() -> float:
    """Return freed memory to the system and reset the peak: RSS now, the baseline of the work's peak."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    return _status_mib("VmRSS")


def run_case(case: str, workload: str, examples: int, batch: int, layers: int = 2, untied: bool = False) -> dict:
    """One case in this process: CPU seconds of the work and peak RSS above the loaded model."""
    import torch

    from fastinfluence import GradientExtractor, ProjectionConfig

    torch.set_num_threads(1)
    w = WORKLOADS[workload]
    model = _model(w["vocab"], layers, untied)
    batches = _batches(w["vocab"], w["seq"], w["answer"], examples, batch)
    loaded = _settle()
    if case == "model":
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        handle = emb.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))

        def work():
            for b in batches:
                model(**b, use_cache=False).loss.backward()

    else:
        include = BLOCKS + ([r"lm_head"] if case == "extract_head" else [])
        extractor = GradientExtractor(model, ProjectionConfig(rank_in=16, rank_out=16, include=include))

        def work():
            extractor.extract(batches)

    start = time.process_time()
    work()
    cpu = time.process_time() - start
    if case == "model":
        handle.remove()
    return {"case": case, "cpu_s": cpu, "peak_above_model_mib": _status_mib("VmHWM") - loaded, "model_rss_mib": loaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="qwen2")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds, one process per case and round")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (2: the peer workload's model)")
    ap.add_argument("--untied", action="store_true", help="an untied LM head (its own weight) instead of the tied one")
    ap.add_argument("--out", default=None, help="default bench/results/realshape_extract_<workload>_cpu.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: run this case only
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.workload, args.examples, args.batch, args.layers, args.untied)))
        return
    cases = args.cases.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.reps):
        for case in cases:
            cmd = [sys.executable, __file__, "--one", case, "--workload", args.workload]
            cmd += ["--examples", str(args.examples), "--batch", str(args.batch), "--layers", str(args.layers)]
            cmd += ["--untied"] if args.untied else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {case}: {runs[case][-1]}", file=sys.stderr)
    med = {
        c: {
            "cpu_s": statistics.median(x["cpu_s"] for x in v),
            "peak_above_model_mib": statistics.median(x["peak_above_model_mib"] for x in v),
        }
        for c, v in runs.items()
    }
    ratios = {}
    if "model" in med:
        for c in cases:
            if c != "model":
                ratios[c] = {
                    "cpu_over_model": med[c]["cpu_s"] / med["model"]["cpu_s"],
                    "memory_over_model": med[c]["peak_above_model_mib"] / med["model"]["peak_above_model_mib"],
                }
    import torch
    from _common import commit

    w = WORKLOADS[args.workload]
    head = "untied" if args.untied else "tied"
    result = {
        "bench": "realshape_extract",
        "workload": dict(
            w,
            name=args.workload,
            model=f"Qwen2-shaped, {args.layers} layers, hidden 896, MLP 4864, {head} head",
        ),
        "examples": args.examples,
        "batch": args.batch,
        "device": f"cpu ({platform.processor() or platform.machine()}, 1 thread)",
        "commit": commit(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "medians": med,
        "ratios": ratios,
        "runs": runs,
    }
    shape = "" if (args.layers, args.untied) == (2, False) else f"_{args.layers}layer{'_untied' if args.untied else ''}"
    out = Path(args.out or f"bench/results/realshape_extract_{args.workload}{shape}_cpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"medians": med, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
