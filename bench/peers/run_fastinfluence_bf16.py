"""fastinfluence with ``ProjectionConfig(autocast="bfloat16")``: the forward (and so the backward)
in bfloat16 on CPUs with AVX-512 BF16 / AMX, projections and scores in float32. Projected
settings only: exact scores stay float32 (run_fastinfluence.py). Its agreement with the exact
scores is recorded beside the float32 runs'."""

from common import main
from run_fastinfluence import BATCHING, MAX_TOKENS, batched

import fastinfluence as fi

INCLUDE = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]


def run(model, data, setting, tmp):
    train, query = batched(data["train"]), batched(data["query"])  # as the float32 runner batches
    k = int(setting.removeprefix("proj"))
    cfg = fi.ProjectionConfig(rank_in=k, rank_out=k, include=INCLUDE, autocast="bfloat16")
    ext = fi.GradientExtractor(model, cfg)
    tr, q = ext.extract(train), ext.extract(query)
    res = fi.score(q, tr, metric="dot", topk=None, matrix_path=tmp.with_suffix(".npy"), aggregates=())
    return res.matrix[:], {
        "method": f"GradientExtractor {k}x{k} per layer, autocast bfloat16 forward, + score, "
        + ("batch 32 in data order" if BATCHING == "order" else f"length-bucketed, {MAX_TOKENS} tokens per batch"),
        "dim": tr.data.shape[1],
    }


if __name__ == "__main__":
    main(run)
