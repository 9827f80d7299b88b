"""Bergson's training-time collector (``GradientCollectorCallback``) timed as ours is.

Runs inside Bergson's virtualenv (``.peers/bergson``), called by ``bench/callback_vs_bergson.py``:

    .peers/bergson/bin/python bench/peers/callback_bergson.py OUT.json [--reps 3 --steps 8 ...]

The same bench model, batches, AdamW and per-step CPU timer as ``bench/train_callback_overhead.py``;
Bergson at its defaults for the callback (projection_dim=16 per side, fp16 store, normalised by the
optimizer's second moments, learning-rate scaled; ``--no-optimizer-state``: plain projected
gradients, what ``InfluenceCallback`` writes), its layers being every Linear of the decoder
(``model.base_model``: q, k, v, o, gate, up, down; no LM head), prepared with
``prepare_for_gradient_collection`` as its documentation says.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import add_model_args, bench_llama, step_timer  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402


def dataset(n: int, seq: int, vocab: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq] * n, "labels": rows})


def run(model, state, data, args, callback: bool, out_dir: str) -> tuple[list[float], float]:
    from bergson.huggingface import GradientCollectorCallback, prepare_for_gradient_collection

    model.load_state_dict(state)
    timer = step_timer()
    callbacks = [timer]
    if callback:
        normalise = not args.no_optimizer_state
        callbacks.append(
            GradientCollectorCallback(Path(out_dir) / "grads", projection_dim=args.rank, use_optimizer_state=normalise)
        )
    targs = TrainingArguments(
        output_dir=f"{out_dir}/out",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    if callback:
        prepare_for_gradient_collection(trainer)
    t0 = time.process_time()
    trainer.train()
    return timer.times[1:], time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    add_model_args(ap)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-optimizer-state", action="store_true", help="use_optimizer_state=False (no normaliser)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = bench_llama(args.vocab, args.hidden, args.layers, heads=8, kv_heads=4).train()
    state = copy.deepcopy(model.state_dict())
    data = dataset(args.batch * args.steps, args.seq, args.vocab)
    steps = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for cb in (False, True):
                t, _ = run(model, state, data, args, cb, f"{tmp}/{rep}-{int(cb)}")
                steps[cb] += t
    import bergson

    out = {
        "tool": "bergson",
        "version": getattr(bergson, "__version__", "2.5.1"),
        "use_optimizer_state": not args.no_optimizer_state,
        "steps_without": steps[False],
        "steps_with": steps[True],
        "step_cpu_s_without": statistics.median(steps[False]),
        "step_cpu_s_with": statistics.median(steps[True]),
        "load_average_1min": os.getloadavg()[0],
    }
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
