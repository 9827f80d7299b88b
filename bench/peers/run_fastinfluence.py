"""fastinfluence: factorised projection per layer (proj16 / proj64; head16 adds the LM head,
a tied head as its share of the tied weight's gradient) or exact ghost scores.

Batches are length-bucketed (``fastinfluence.batching.length_batches``, the setting the README
recommends for data of varied length; Bergson batches by length too): examples sorted longest
first, cut into batches of at most ``MAX_TOKENS`` padded tokens, features and scores handed back
in data order. On fixed-length data that is the data order itself. ``FI_PEER_BATCHING=order``
runs the plain data-order batches of 32 instead (bench/bucketing.py compares the two).

Biases are left out (``include_bias=False``; our default captures them), so the scores are the
weight-gradient inner products the reference computes. It matters only on models with biased
Linear layers (Qwen2's q, k, v), where the bias terms dominate the inner products of
random-token data.
"""

import os

from common import batches, captures_head, main, pad, rank

import fastinfluence as fi
from fastinfluence.batching import length_batches

INCLUDE = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]
HEAD = [r"^lm_head$"]
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
        config = fi.ProjectionConfig(include=INCLUDE, include_bias=False)
        S = fi.exact_scores(model, query, train, config=config, metric="dot")
        return S.numpy(), {"method": f"exact_scores (ghost/dense per layer), {how}"}
    k = rank(setting)
    include = INCLUDE + (HEAD if captures_head(setting) else [])
    config = fi.ProjectionConfig(rank_in=k, rank_out=k, include=include, include_bias=False)
    ext = fi.GradientExtractor(model, config)
    tr, q = ext.extract(train), ext.extract(query)
    res = fi.score(q, tr, metric="dot", topk=None, matrix_path=tmp.with_suffix(".npy"), aggregates=())
    return res.matrix[:], {
        "method": f"GradientExtractor {k}x{k} per layer{' and the LM head' * captures_head(setting)} + score, {how}",
        "dim": tr.data.shape[1],
    }


if __name__ == "__main__":
    main(run)
