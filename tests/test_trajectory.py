"""Trajectory scores (TracIn-CP) over InfluenceCallback stores equal a brute-force reference."""

from __future__ import annotations

import pytest
import torch
from helpers import collate, make_examples, slow_gradients, tiny_model
from test_callback import EXAMPLES, _exact, _train

from fastinfluence import GradientExtractor, ProjectionConfig
from fastinfluence.trajectory import tracin

TRAIN = EXAMPLES[:6]
QUERIES = make_examples(3, seed=11)
STEPS, LR = 5, 1e-2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two epochs and a bit of 3 steps each (batch 2, sequential order, linear decay), one store per step."""
    tmp = tmp_path_factory.mktemp("traj")
    model = _exact(tiny_model("gpt2", torch.float64))
    # Ranks above every side's width: identity projections, so features are the exact gradients.
    config = ProjectionConfig(rank_in=160, rank_out=160, dtype="float64")
    callback, snaps = _train(
        model,
        tmp,
        config,
        accumulation=1,
        steps=STEPS,
        examples=TRAIN,
        train_sampling_strategy="sequential",
        lr_scheduler_type="linear",
        learning_rate=LR,
    )
    final = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = {b: snaps.weights[b + 1] if b < STEPS else final for b in range(1, STEPS + 1)}
    return tmp / "features", model, config, snaps, checkpoints


def test_tracin_equals_brute_force(run):
    out, model, config, snaps, checkpoints = run
    queries, reference = {}, torch.zeros(len(QUERIES), len(TRAIN), dtype=torch.float64)
    for step in range(1, STEPS + 1):
        model.load_state_dict(checkpoints[step])
        queries[step] = GradientExtractor(model, config).extract([collate(QUERIES)])
        g_q, _ = slow_gradients(model, QUERIES)
        model.load_state_dict(snaps.weights[step])  # the weights step `step` trained with
        first = 2 * (step - 1) % len(TRAIN)
        g_train, _ = slow_gradients(model, TRAIN[first : first + 2])
        lr = LR * (STEPS - (step - 1)) / STEPS  # the Trainer's linear schedule without warmup
        reference[:, first : first + 2] += lr * g_q.double() @ g_train.double().T
    result = tracin(queries, out, topk=None, aggregates=("mean", "sum"))
    assert result.train_ids == [100 + i for i in range(len(TRAIN))]
    S = torch.zeros_like(reference)
    S.scatter_(1, result.topk_indices, result.topk_values.double())
    assert torch.allclose(S, reference, rtol=1e-5, atol=1e-7 * reference.abs().max())  # float32 results
    assert torch.allclose(result.aggregates["sum"].double(), reference.sum(0), rtol=1e-5)
    assert result.topk_indices[:, 0].tolist() == reference.argmax(1).tolist()


def test_missing_checkpoint_queries_are_named(run):
    out, model, config, *_ = run
    with pytest.raises(ValueError, match=r"steps \[2, 3, 4, 5\]"):
        tracin({1: GradientExtractor(model, config).extract([collate(QUERIES)])}, out)


def test_queries_from_the_wrong_checkpoint_name_the_step(run):
    out, model, config, _, checkpoints = run
    queries = {}
    for step in range(1, STEPS + 1):
        model.load_state_dict(checkpoints[1 if step == 3 else step])  # step 3's queries from checkpoint-1
        queries[step] = GradientExtractor(model, config).extract([collate(QUERIES)])
    with pytest.raises(ValueError, match=r"queries given for step 3 do not match .* extract them from checkpoint-3"):
        tracin(queries, out)


def test_trajectory_command_writes_the_api_top_k(run, tmp_path):
    """``fastinfluence trajectory --query STEP=DIR ...``: the API's TracIn-CP top-k, as JSON."""
    import json

    from fastinfluence.cli import main

    out, model, config, _, checkpoints = run
    flags, queries = [], {}
    for step in range(1, STEPS + 1):
        model.load_state_dict(checkpoints[step])
        store = tmp_path / f"q{step}"
        GradientExtractor(model, config).extract([collate(QUERIES)], store=store)
        queries[step] = GradientExtractor(model, config).extract([collate(QUERIES)])
        flags += ["--query", f"{step}={store}"]
    target = tmp_path / "top.json"
    assert main(["--quiet", "trajectory", "--train", str(out), *flags, "--topk", "3", "--out", str(target)]) == 0
    ref = tracin(queries, out, topk=3)
    got = json.loads(target.read_text())["queries"]
    assert [q["id"] for q in got] == ref.query_ids
    for q, row in zip(got, ref.topk_values.tolist()):
        assert [t["train_id"] for t in q["top"]] == ref.topk_ids[ref.query_ids.index(q["id"])]
        assert [t["score"] for t in q["top"]] == pytest.approx(row, rel=1e-6)
    # a step without its query store is one line, before any scoring
    assert main(["--quiet", "trajectory", "--train", str(out), *flags[:-2], "--out", str(tmp_path / "x.json")]) == 2
