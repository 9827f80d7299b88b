"""Training overhead of InfluenceCallback: the same HF Trainer run with and without it.

Both runs train the CPU bench model (Llama, hidden 256, 4 layers, vocab 4096; batch 8 x 128
tokens, AdamW) from the same weights on the same batches. A timing callback records the CPU
time of each optimizer step (on_step_begin -> on_step_end: forward, backward, clipping,
optimizer step; with the callback also the per-layer projection and the rows' copy to the
host), process CPU time so that other jobs on a shared machine count less than in wall time
(one thread: the process's CPU time is the step's). The store is written after the last step
(``every`` = all steps); its cost is reported separately as the difference of whole
``train()`` CPU times. Runs alternate so that machine load hits both; the load average is
recorded at the start and the end.

    python bench/train_callback_overhead.py [--features gradient,adam] [--out bench/results/<file>.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
from _common import add_model_args, bench_llama, model_record, step_timer
from transformers import Trainer, TrainingArguments

from fastinfluence import InfluenceCallback, ProjectionConfig


class Parts:
    """CPU seconds spent inside the callback's hooks (its per-layer projection, its per-batch
    bookkeeping, the store write), from wrappers whose own cost is a few microseconds a call."""

    HOOKS = {
        "_on_layer": "projection",
        "_before_forward": "bookkeeping",
        "_after_forward": "bookkeeping",
        "_finish_micro_batch": "bookkeeping",
        "flush": "store_write",
    }

    def __init__(self):
        self.seconds = {v: 0.0 for v in self.HOOKS.values()}
        for name, part in self.HOOKS.items():
            setattr(InfluenceCallback, name, self._timed(getattr(InfluenceCallback, name), part))

    def _timed(self, fn, part):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.process_time() - t0

        return timed


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.ids[i],
            "id": i,
        }


def run(model, state, data, args, callback: bool, out_dir: str) -> tuple[list[float], float]:
    model.load_state_dict(state)
    timer = step_timer()
    callbacks = [timer]
    if callback:
        callbacks.append(
            InfluenceCallback(
                f"{out_dir}/features",
                ProjectionConfig(
                    rank_in=args.rank, rank_out=args.rank, **({"include": [args.include]} if args.include else {})
                ),
                every=args.steps,
                features=tuple(args.features.split(",")),
            )
        )
    targs = TrainingArguments(
        output_dir=f"{out_dir}/out",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    t0 = time.process_time()
    trainer.train()
    return timer.times[1:], time.process_time() - t0  # the first step warms up allocators and caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--features", default="gradient", help="InfluenceCallback features, comma-separated (gradient, adam)"
    )
    ap.add_argument("--include", default=None, help="regex of the captured layers (default: every trainable Linear)")
    ap.add_argument("--lora", type=int, default=0, help="train LoRA adapters of this rank on every Linear (0: none)")
    ap.add_argument("--out", default="bench/results/train_callback_overhead_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bench_llama(args.vocab, args.hidden, args.layers, heads=8, kv_heads=4).train()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=args.lora, target_modules=targets, lora_dropout=0.0)).train()
    state = copy.deepcopy(model.state_dict())
    data = Rows(args.batch * args.steps, args.seq, args.vocab)
    load_start = os.getloadavg()[0]
    steps = {False: [], True: []}
    totals = {False: [], True: []}
    parts = Parts()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for cb in (False, True):
                t, total = run(model, state, data, args, cb, f"{tmp}/{rep}-{int(cb)}")
                steps[cb] += t
                totals[cb].append(total)
    base, with_cb = statistics.median(steps[False]), statistics.median(steps[True])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "bench": "train_callback_overhead",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit,
        "torch": torch.__version__,
        "model": model_record(args, model),
        "batch": args.batch,
        "seq": args.seq,
        "rank": [args.rank, args.rank],
        "features": args.features.split(","),
        "include": args.include,
        "lora_rank": args.lora or None,
        "steps_per_run": args.steps,
        "reps": args.reps,
        "timer": "process CPU time (time.process_time), 1 thread",
        "step_cpu_s_without": base,
        "step_cpu_s_with": with_cb,
        "step_overhead": with_cb / base - 1,
        "train_cpu_s_without": statistics.median(totals[False]),
        "train_cpu_s_with": statistics.median(totals[True]),
        "callback_cpu_s_per_step": {
            k: v / (args.reps * args.steps) for k, v in parts.seconds.items() if k != "store_write"
        },
        "store_write_cpu_s_per_run": parts.seconds["store_write"] / args.reps,
        "train_overhead_incl_store_write": statistics.median(totals[True]) / statistics.median(totals[False]) - 1,
        "goal": "step_overhead <= 0.10" if args.features == "gradient" else "none: the dense Adam path of LESS",
        "load_average_1min_at_start": load_start,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
