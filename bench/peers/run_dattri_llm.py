"""dattri-llm: the on-the-fly ``TracInAttributor.attribute`` (single checkpoint = Grad-Dot),
factorised capture on the attention and MLP Linear layers with ``invasive_linear_io`` (no
weight-gradient matmul, its attribution-only capture), ``capture_style="auto"`` (its FLOP-aware
routing), and for the projected settings its LoGRA (two-sided) projection at capture; ``head16``
adds the LM head module to the captured layers."""

import tempfile

from common import captures_head, example_losses, main, pad, rank
from dattri_llm import AttributionArguments, AttributionTask, HookManagerConfig, TracInAttributor, hash_sample

LAYERS = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]
HEAD = [r"^lm_head$"]
BATCH = 32


def loss_fn(model, batch):
    # items are padded to the set's longest example; trim each batch to its own longest one
    T = int(batch["attention_mask"].sum(1).max())
    return example_losses(model, {k: v[:, :T] for k, v in batch.items()}).sum()


def run(model, data, setting, tmp):
    T = max(len(e["input_ids"]) for e in data["train"] + data["query"])

    def items(examples):
        b = pad(examples + [{"input_ids": [0] * T, "labels": [-100] * T}])
        return [{k: v[i] for k, v in b.items()} for i in range(len(examples))]

    train, query = items(data["train"]), items(data["query"])
    proj = None
    if setting != "exact":
        k = rank(setting)
        proj = {
            "__default__": {"style": "logra", "proj_dim": k, "proj_max_batch_size": BATCH, "proj_type": "rademacher"}
        }
    layers = LAYERS + (HEAD if captures_head(setting) else [])
    cfg = HookManagerConfig(invasive_linear_io=layers, capture_style="auto", projection_kwargs=proj)
    args = AttributionArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH, use_cpu=True
    )
    score = TracInAttributor(args, task=AttributionTask(loss_func=loss_fn, model=model)).attribute(
        train, query, hook_config=cfg
    )
    ids, M = score.agnostic_matrix()
    row = {h: i for i, h in enumerate(ids)}  # rows are keyed by the hash of the unpadded input ids
    order = [row[hash_sample({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]})] for x in train]
    return M[order].T.double().numpy(), {
        "method": "TracInAttributor.attribute, invasive_linear_io, capture_style=auto"
        + ("" if proj is None else f", logra proj_dim={k} rademacher")
        + (", LM head captured" if captures_head(setting) else "")
    }


if __name__ == "__main__":
    main(run)
