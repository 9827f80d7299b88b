"""fastinfluence with ``ProjectionConfig(autocast="bfloat16")``: the forward (and so the backward)
in bfloat16 on CPUs with AVX-512 BF16 / AMX. Projected settings: the side products of the
projection in bfloat16 too (the host backend's ``project``), the sum over tokens, features and
scores in float32. ``exact``: per-example gradients and their dots as bfloat16 matmuls
(float32 accumulation), summed over layers in float32. Its agreement with the float32 exact
scores is recorded beside the float32 runs'."""

from common import main
from run_fastinfluence import BATCHING, INCLUDE, MAX_TOKENS, batched

import fastinfluence as fi


def run(model, data, setting, tmp):
    train, query = batched(data["train"]), batched(data["query"])  # as the float32 runner batches
    how = "batch 32 in data order" if BATCHING == "order" else f"length-bucketed, {MAX_TOKENS} tokens per batch"
    if setting == "exact":
        cfg = fi.ProjectionConfig(include=INCLUDE, autocast="bfloat16")
        S = fi.exact_scores(model, query, train, config=cfg, metric="dot")
        return S.numpy(), {"method": f"exact_scores, autocast bfloat16 forward and products, {how}"}
    k = int(setting.removeprefix("proj"))
    cfg = fi.ProjectionConfig(rank_in=k, rank_out=k, include=INCLUDE, autocast="bfloat16")
    ext = fi.GradientExtractor(model, cfg)
    tr, q = ext.extract(train), ext.extract(query)
    res = fi.score(q, tr, metric="dot", topk=None, matrix_path=tmp.with_suffix(".npy"), aggregates=())
    return res.matrix[:], {
        "method": f"GradientExtractor {k}x{k} per layer, autocast bfloat16 forward and projection, + score, {how}",
        "dim": tr.data.shape[1],
    }


if __name__ == "__main__":
    main(run)
