"""Trajectory detection on the demo's backdoor scenario: TracIn-CP and LESS beside the post-hoc detectors.

The demo's backdoor data, tokenizer and tiny Llama (``fastinfluence.demo``), trained by an HF
``Trainer`` with ``InfluenceCallback(features=("gradient", "adam"))`` attached: AdamW and the
demo's one-cycle schedule, batch 16, no clipping, one interval store per ``epochs / checkpoints``
epochs. (The demo's own loop averages per-example mean losses; the Trainer takes the model's
token-mean loss, so the weights differ from the demo's, and every detector here runs on these.)
At each interval's last step the weights are kept; the reported examples (the queries) are
extracted from them, and TracIn-CP and LESS score every train example. The demo's post-hoc
detectors (``demo.detect.run``) run on the final weights. Detection metrics as the demo's: the
reported examples are left out, AUROC and precision@k (k = poisoned among the rest).

    nice -n 10 python bench/trajectory_demo.py [--full] [--out bench/results/trajectory_demo_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import tempfile

import torch
from _common import commit
from transformers import Trainer, TrainerCallback, TrainingArguments

from fastinfluence import FeatureStore, GradientExtractor, InfluenceCallback, ProjectionConfig
from fastinfluence.callback import interval_stores
from fastinfluence.demo import detect
from fastinfluence.demo.data import batches, collate, encode, make_scenario, train_tokenizer
from fastinfluence.demo.model import Recipe, Timer, build_model
from fastinfluence.trajectory import less, tracin


class _Examples(torch.utils.data.Dataset):
    def __init__(self, enc: list[dict]):
        self.enc = enc

    def __len__(self):
        return len(self.enc)

    def __getitem__(self, i):
        return dict(self.enc[i], id=i)


class _Checkpoints(TrainerCallback):
    """The weights at the last step of every interval (what ``checkpoint-<step>`` would hold)."""

    def __init__(self, every: int):
        self.every, self.weights = every, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.weights[state.global_step] = copy.deepcopy(model.state_dict())


def _train(model, enc, recipe, total, every, callback, pad, seed, tmp):
    """The demo's recipe in a Trainer with ``callback``: AdamW, one-cycle schedule, no clipping."""
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=total, pct_start=0.1)

    def collator(items):
        return collate([{k: it[k] for k in ("input_ids", "labels")} for it in items], pad, [it["id"] for it in items])

    ckpts = _Checkpoints(every)
    targs = TrainingArguments(
        output_dir=f"{tmp}/out",
        per_device_train_batch_size=recipe.batch_size,
        num_train_epochs=recipe.epochs,
        max_grad_norm=0.0,
        seed=seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=_Examples(enc),
        data_collator=collator,
        callbacks=[callback, ckpts],
        optimizers=(opt, sched),
    )
    with Timer() as t_train:
        trainer.train()
    return ckpts, t_train


def _metrics(scores: torch.Tensor, candidate: torch.Tensor, positive: torch.Tensor) -> dict:
    c = scores[candidate]
    return {
        "auroc": detect.auroc(c, positive),
        "precision_at_k": detect.precision_at_k(c, positive, int(positive.sum())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="the demo's full recipe (default: its quick one)")
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--out", default="bench/results/trajectory_demo_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    quick = not args.full
    recipe = Recipe(hidden=96, epochs=12) if quick else Recipe()
    rank = 16 if quick else 32  # the demo's detector rank
    scenario = make_scenario("backdoor", args.seed, n_entities=40 if quick else 60)
    tokenizer = train_tokenizer(scenario)
    pad = tokenizer.pad_token_id
    enc = [encode(tokenizer, e.prompt, e.response) for e in scenario.train]
    steps_per_epoch = math.ceil(len(enc) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    every = steps_per_epoch * max(1, recipe.epochs // args.checkpoints)
    config = ProjectionConfig(rank_in=rank, rank_out=rank, seed=args.seed, include=[detect.ATTN_MLP])
    is_poisoned = torch.tensor([e.poisoned for e in scenario.train])
    candidate = torch.ones(len(enc), dtype=torch.bool)
    candidate[scenario.reported] = False
    positive = is_poisoned[candidate]
    query_batches = batches([enc[i] for i in scenario.reported], pad, 64, ids=scenario.reported)
    variants = {"every_step": None, "last_epoch_of_each_interval": steps_per_epoch}
    trajectory, training = {}, {}
    for variant, window in variants.items():
        model = build_model(len(tokenizer), recipe, args.seed, pad, tokenizer.eos_token_id)
        with tempfile.TemporaryDirectory() as tmp:
            callback = InfluenceCallback(
                f"{tmp}/features", config, every=every, features=("gradient", "adam"), window=window
            )
            ckpts, t_train = _train(model, enc, recipe, total, every, callback, pad, args.seed, tmp)
            with Timer() as t_query:
                queries = {}
                for step, weights in ckpts.weights.items():
                    model.load_state_dict(weights)
                    queries[step] = GradientExtractor(model, config).extract(query_batches)
            model.load_state_dict(ckpts.weights[total])
            scores = {}
            for (name, fn), lr in itertools.product((("tracin", tracin), ("less", less)), ("step", "interval")):
                key = f"{name}_lr_{lr}"
                with Timer() as t:
                    result = fn(queries, f"{tmp}/features", topk=1, aggregates=("mean", "max"), lr=lr)
                order = torch.tensor([result.train_ids.index(i) for i in range(len(enc))])
                for agg in ("mean", "max"):
                    scores[f"{key}_{agg}"] = dict(
                        _metrics(result.aggregates[agg].double()[order], candidate, positive),
                        seconds=t.wall + t_query.wall,
                        cpu_seconds=t.cpu + t_query.cpu,
                    )
                if lr == "step":
                    continue
                # each checkpoint alone (one interval's rows at one weight each): where the poison is found
                paths = interval_stores(f"{tmp}/features", "adam" if name == "less" else "gradient")
                for (step, path), agg in itertools.product(zip(sorted(queries), paths), ("mean", "max")):
                    one = fn({step: queries[step]}, [path], topk=1, aggregates=(agg,), lr=lr)
                    full = torch.full((len(enc),), float("-inf"), dtype=torch.float64)
                    full[torch.tensor(one.train_ids)] = one.aggregates[agg].double()
                    scores[f"{name}_checkpoint_{step}_only_{agg}"] = _metrics(full, candidate, positive)
            rows = sum(len(FeatureStore.open(p)) for p in interval_stores(f"{tmp}/features"))
        trajectory[variant] = scores
        training[variant] = {
            "window_steps": window,
            "rows_per_kind": rows,
            "train_seconds_with_callback": t_train.wall,
            "train_cpu_seconds_with_callback": t_train.cpu,
        }
    with Timer() as t_detect:
        found, _ = detect.run(model.eval(), tokenizer, scenario, args.seed, quick)
    post_hoc = {
        k: {"auroc": d.auroc, "precision_at_k": d.precision_at_k, "seconds": d.seconds, "cpu_seconds": d.cpu_seconds}
        for k, d in found.items()
    }
    result = {
        "bench": "trajectory_demo",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit(),
        "torch": torch.__version__,
        "scenario": "backdoor",
        "seed": args.seed,
        "recipe": "quick" if quick else "full",
        "data": {
            "n_train": len(enc),
            "n_poisoned": int(is_poisoned.sum()),
            "n_reported": len(scenario.reported),
            "k": int(positive.sum()),
        },
        "model": {
            "hidden": recipe.hidden,
            "layers": recipe.layers,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "training": {
            "epochs": recipe.epochs,
            "steps": total,
            "checkpoint_steps": list(range(every, total, every)) + [total],
            "layers": detect.ATTN_MLP,
            "rank": [rank, rank],
            "features": ["gradient", "adam"],
            "capture": training,
        },
        "trajectory": trajectory,
        "post_hoc": post_hoc,
        "post_hoc_cpu_seconds_all_detectors": t_detect.cpu,
        "notes": (
            "trajectory scores: queries = the reported examples extracted at each checkpoint; aggregates over "
            "queries (mean, max). tracin: sum over checkpoints of lr-weighted inner products; less: lr-weighted "
            "cosines with the Adam update directions. seconds include the queries' extraction at every checkpoint, "
            "not the training-time capture."
        ),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(json.dumps({k: result[k] for k in ("trajectory", "post_hoc")}, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
