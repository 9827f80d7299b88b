"""Extraction against a training step, the truncated backward, the LM head without backward,
the bfloat16 autocast option and exact scores, on the CPU bench model (tiny Llama 256-d,
4 layers, vocab 512; one batch of 16 x 64 tokens).

Each case records what it timed in ``extra_info`` (``case``, ``layers``, ``path``); the
converter derives the ratios (extraction over a training step, full over truncated path).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from _common import bench_llama

from fastinfluence import GradientExtractor, ProjectionConfig, capture, exact_scores

B, T, RANK = 16, 64, 16
SETS = {"lm_head": [r"lm_head$"], "last_block": [r"layers\.3\."], "all_layers": [r"."]}
PEER_LAYERS = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = bench_llama(intermediate=512)
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, batch


def test_train_step(timed, setup):
    model, batch = setup

    def step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    timed(step, group="extract", case="train_step", layers="all", path="forward + backward with weight gradients")


def _full_backward(ex, batch):
    """The extractor's features through the capture pass from the input embeddings."""

    def run():
        fused, ex.capture.fused = ex.capture.fused, None
        try:
            start = lambda m, _l: ("embeddings", m.get_input_embeddings())  # noqa: E731
            with mock.patch.object(capture, "backward_start", start):
                return ex.extract([batch])
        finally:
            ex.capture.fused = fused

    return run


def _cut_autograd(ex, batch):
    """LM-head features through autograd with the backward cut at the head's input."""

    def run():
        fused, ex.capture.fused = ex.capture.fused, None
        try:
            return ex.extract([batch])
        finally:
            ex.capture.fused = fused

    return run


@pytest.mark.parametrize("layers", list(SETS))
@pytest.mark.parametrize("path", ["truncated", "full", "cut_autograd", "truncated_bf16"])
def test_extract(timed, setup, layers, path):
    if path == "cut_autograd" and layers != "lm_head":
        pytest.skip("the cut backward differs from the truncated path only for the LM head")
    model, batch = setup
    autocast = "bfloat16" if path.endswith("bf16") else None
    cfg = ProjectionConfig(include=SETS[layers], rank_in=RANK, rank_out=RANK, autocast=autocast)
    ex = GradientExtractor(model, cfg)
    fn = {"full": _full_backward, "cut_autograd": _cut_autograd}.get(path, lambda e, b: lambda: e.extract([b]))
    feats = timed(fn(ex, batch), group="extract", case="extract", layers=layers, path=path)
    assert feats.data.shape == (B, ex.dim) and bool(torch.isfinite(feats.data).all())


def test_exact_scores(timed, setup):
    model, batch = setup
    half = {k: v[: B // 2] for k, v in batch.items()}
    rest = {k: v[B // 2 :] for k, v in batch.items()}
    cfg = ProjectionConfig(include=PEER_LAYERS)
    S = timed(
        lambda: exact_scores(model, [half], [rest], config=cfg),
        group="exact",
        case="exact_scores",
        layers="attention + MLP Linear",
        path=f"{B // 2} queries x {B // 2} train",
    )
    assert S.shape == (B // 2, B // 2)
