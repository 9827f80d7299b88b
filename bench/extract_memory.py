"""Peak memory of one extraction step: loss from hidden states (chunked linear
cross-entropy, the default when the LM head is not captured) against the model's own
B x T x V logits, on a LoRA model. Each measurement runs in a fresh process.

    python bench/extract_memory.py [--out bench/results/extract_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
from _common import commit


def _status_kib(field: str) -> int:
    """VmRSS / VmHWM of this process (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Reset VmHWM to the resident size now (Linux >= 4.0) and return that size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def child(args) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastinfluence import GradientExtractor, ProjectionConfig, capture

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if args.path == "logits":
        capture.fused_head = lambda _model: None
    ex = GradientExtractor(model, ProjectionConfig(rank_in=16, rank_out=16))
    base = _reset_peak()
    t0 = time.perf_counter()
    ex.extract([batch])
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(json.dumps({"path": args.path, "peak_extra_MiB": (peak - base) / 1024, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--path", choices=["fused", "logits"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/extract_memory_cpu.json")
    args = ap.parse_args()
    if args.path:
        return child(args)
    rows = []
    for path in ("logits", "fused"):
        cmd = [
            sys.executable,
            __file__,
            "--path",
            path,
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1])
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    result = {
        "bench": "extract_memory",
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit(),
        "torch": torch.__version__,
        "model": {"arch": "llama + LoRA r=16 (q_proj, v_proj)", "hidden": args.hidden, "vocab": args.vocab},
        "batch": args.batch,
        "seq": args.seq,
        "float32_logits_MiB": logits_mib,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
