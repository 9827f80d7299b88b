"""fastinfluence: factorised projection per layer (proj16 / proj64) or exact ghost scores."""

from common import batches, main

import fastinfluence as fi

INCLUDE = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]


def run(model, data, setting, tmp):
    train, query = batches(data["train"], 32), batches(data["query"], 32)
    if setting == "exact":
        S = fi.exact_scores(model, query, train, config=fi.ProjectionConfig(include=INCLUDE), metric="dot")
        return S.numpy(), {"method": "exact_scores (ghost/dense per layer), batch 32"}
    k = int(setting.removeprefix("proj"))
    ext = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=k, rank_out=k, include=INCLUDE))
    tr, q = ext.extract(train), ext.extract(query)
    res = fi.score(q, tr, metric="dot", topk=None, matrix_path=tmp.with_suffix(".npy"), aggregates=())
    return res.matrix[:], {"method": f"GradientExtractor {k}x{k} per layer + score, batch 32", "dim": tr.data.shape[1]}


if __name__ == "__main__":
    main(run)
