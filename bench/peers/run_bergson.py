"""Bergson: its gradient collector (per-module two-sided Rademacher projection, or none for
exact) over length-aware batches (its ``allocate_batches`` with the default 2048-token budget);
the query gradients collected once, the train set scored on the fly by its ``Scorer`` (the
single-pass in-memory-query path its README recommends for small query sets). The model is
frozen as its ``setup_model_and_peft`` leaves it: every weight frozen except the input
embeddings (on a tied model that is the LM head's weight too, so backward forms its gradient).
Its pipeline hooks ``model.base_model``, which holds no LM head; ``head16`` hooks the whole
model instead, the block layers under their full names and ``lm_head``."""

import os
import tempfile

import torch
from bergson import CollectorComputer, IndexConfig, InMemoryCollector, Scorer
from bergson.data import allocate_batches
from bergson.score.score_writer import InMemorySequenceScoreWriter
from bergson.utils.worker_utils import processor_for
from common import HEAD, LAYER_SUFFIXES, captures_head, main, rank
from datasets import Dataset


def collect(model, root, examples, cfg, processor, modules, scorer=None):
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]})
    order = allocate_batches([len(e["input_ids"]) for e in examples], cfg.token_batch_size)
    col = InMemoryCollector(model=root, cfg=cfg, processor=processor, data=ds, target_modules=modules, scorer=scorer)
    CollectorComputer(model=model, data=ds, collector=col, batches=order, cfg=cfg).run_with_collector_hooks()
    return col


def run(model, data, setting, tmp):
    k = 0 if setting == "exact" else rank(setting)
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)
    cfg = IndexConfig(run_path=tempfile.mkdtemp(), projection_dim=k, loss_reduction="mean", projection_seed=0)
    os.makedirs(cfg.partial_run_path, exist_ok=True)
    processor = processor_for(cfg)
    head = captures_head(setting)
    root = model if head else model.base_model
    suffixes = LAYER_SUFFIXES + ((HEAD,) if head else ())
    modules = {n for n, m in root.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)}
    q = collect(model, root, data["query"], cfg, processor, modules).gradients
    names = sorted(q)
    writer = InMemorySequenceScoreWriter(len(data["train"]), len(data["query"]))
    scorer = Scorer(q, names, writer, torch.device("cpu"), torch.float32)
    collect(model, root, data["train"], cfg, processor, modules, scorer=scorer)
    return writer.scores.T.numpy(), {
        "method": f"InMemoryCollector projection_dim={k or 'none'} + Scorer, "
        f"token_batch_size={cfg.token_batch_size}, loss_reduction=mean, weights frozen but the input embeddings"
        + (", LM head hooked" if head else "")
    }


if __name__ == "__main__":
    main(run)
