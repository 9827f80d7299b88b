"""fastinfluence on the model cast to bfloat16 (as ``bergson-bf16`` runs Bergson): the forward,
backward and the projection's side products in bfloat16 (the host backend's ``project``), the
sum over tokens, features and scores in float32. Projected settings only."""

import torch
from common import main
from run_fastinfluence import BATCHING, INCLUDE, MAX_TOKENS, batched

import fastinfluence as fi


def run(model, data, setting, tmp):
    model = model.to(torch.bfloat16)
    train, query = batched(data["train"]), batched(data["query"])
    k = int(setting.removeprefix("proj"))
    ext = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=k, rank_out=k, include=INCLUDE))
    tr, q = ext.extract(train), ext.extract(query)
    res = fi.score(q, tr, metric="dot", topk=None, matrix_path=tmp.with_suffix(".npy"), aggregates=())
    how = "batch 32 in data order" if BATCHING == "order" else f"length-bucketed, {MAX_TOKENS} tokens per batch"
    return res.matrix[:], {
        "method": f"GradientExtractor {k}x{k} per layer on the model in bfloat16, + score, {how}",
        "dim": tr.data.shape[1],
    }


if __name__ == "__main__":
    main(run)
