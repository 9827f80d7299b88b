"""LogIX: ``watch`` the attention and MLP Linear layers, ``add_lora`` (its random
encoder / zero bottleneck / random decoder compression at rank k), log the per-sample
bottleneck gradients of the train set to its on-disk log, then ``compute_influence_all``
for the query batches (``mode="dot"``, no preconditioner, to match the exact dot scores);
``head16`` adds ``lm_head`` to the watched names."""

import os
import tempfile

import logix
import torch
from common import HEAD, LAYER_SUFFIXES, batches, captures_head, example_losses, main, rank
from logix.config import LoRAConfig

BATCH = 32


def run(model, data, setting, tmp):
    k = rank(setting)
    os.chdir(tempfile.mkdtemp())
    lx = logix.LogIX(project="bench")
    lx.watch(model, name_filter=list(LAYER_SUFFIXES) + ([HEAD] if captures_head(setting) else []))
    lx.add_lora(lora_config=LoRAConfig(init="random", rank=k))
    lx.setup({"grad": ["log"]})
    lx.save(True)
    for i, b in enumerate(batches(data["train"], BATCH)):
        ids = [f"train{i * BATCH + j}" for j in range(len(b["input_ids"]))]
        with lx(data_id=ids, mask=b["attention_mask"]):
            model.zero_grad()
            example_losses(model, b).sum().backward()
    lx.finalize()
    loader = lx.build_log_dataloader(batch_size=64)
    lx.setup({"grad": ["log"]})
    lx.eval()
    rows = []
    for i, b in enumerate(batches(data["query"], BATCH)):
        ids = [f"query{i * BATCH + j}" for j in range(len(b["input_ids"]))]
        with lx(data_id=ids, mask=b["attention_mask"]):
            model.zero_grad()
            example_losses(model, b).sum().backward()
        res = lx.compute_influence_all(lx.get_log(), loader, mode="dot", precondition=False)
        order = [int(t.removeprefix("train")) for t in res["tgt_ids"]]
        S = torch.empty_like(res["influence"])
        S[:, order] = res["influence"]
        rows.append(S)
    method = f"watch + add_lora(random, rank={k}) + log + compute_influence_all(dot)"
    return torch.cat(rows).double().numpy(), {"method": method}


if __name__ == "__main__":
    main(run)
