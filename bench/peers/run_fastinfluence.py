"""fastinfluence: factorised projection per layer (proj16 / proj64) or exact ghost scores.

Batches are length-bucketed (``fastinfluence.batching.length_batches``, the setting the README
recommends for data of varied length; Bergson batches by length too): examples sorted longest
first, cut into batches of at most ``MAX_TOKENS`` padded tokens, features and scores handed back
in data order. On fixed-length data that is the data order itself. ``FI_PEER_BATCHING=order``
runs the plain data-order batches of 32 instead (bench/bucketing.py compares the two).
"""

import os

from common import batches, main, pad

import fastinfluence as fi
from fastinfluence.batching import length_batches

INCLUDE = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]
BATCHING = os.environ.get("FI_PEER_BATCHING", "length")
BATCH, MAX_TOKENS = 32, int(os.environ.get("FI_PEER_MAX_TOKENS", "2048"))


def batched(examples: list[dict]) -> list[dict]:
    if BATCHING == "order":
        return batches(examples, BATCH)
    plan = length_batches([len(e["input_ids"]) for e in examples], batch_size=None, max_tokens=MAX_TOKENS, window=None)
    return [dict(pad([examples[i] for i in idx]), positions=idx) for idx in plan]


def run(model, data, setting, tmp):
    train, query = batched(data["train"]), batched(data["query"])
    how = f"batch {BATCH} in data order" if BATCHING == "order" else f"length-bucketed, {MAX_TOKENS} tokens per batch"
    if setting == "exact":
        S = fi.exact_scores(model, query, train, config=fi.ProjectionConfig(include=INCLUDE), metric="dot")
        return S.numpy(), {"method": f"exact_scores (ghost/dense per layer), {how}"}
    k = int(setting.removeprefix("proj"))
    ext = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=k, rank_out=k, include=INCLUDE))
    tr, q = ext.extract(train), ext.extract(query)
    res = fi.score(q, tr, metric="dot", topk=None, matrix_path=tmp.with_suffix(".npy"), aggregates=())
    return res.matrix[:], {"method": f"GradientExtractor {k}x{k} per layer + score, {how}", "dim": tr.data.shape[1]}


if __name__ == "__main__":
    main(run)
