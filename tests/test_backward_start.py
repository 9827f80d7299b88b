"""The backward starts at the lowest captured layer: same gradients, less backward, model untouched."""

import pytest
import torch
from helpers import batches_of, make_examples, rel_err, slow_gradients, tiny_model

import fastinfluence as fi
from fastinfluence import capture
from fastinfluence.capture import backward_start, frozen_for_capture, select_layers

# (include regexes, where the graph must start)
CASES = {
    "llama": [
        ([r"lm_head"], "head"),
        ([r"layers\.1\."], "block"),
        ([r"layers\.1\.mlp", r"layers\.1\.self_attn\.o_proj"], "block"),
        ([r"layers\.0\.mlp", r"layers\.1\.self_attn"], "block"),
        ([r"lm_head", r"layers\.1\.mlp"], "block"),  # the head lies above every block
        ([r"."], "block"),
    ],
    "gpt2": [([r"h\.1\."], "block"), ([r"h\.0\.attn", r"h\.1\.mlp"], "block")],  # its tiny LM head is tied
}


def _layers(model, include):
    cfg = fi.ProjectionConfig(include=include)
    return select_layers(model, cfg.include, cfg.exclude, cfg.include_bias)


@pytest.mark.parametrize("arch,include,kind", [(a, i, k) for a, cases in CASES.items() for i, k in cases])
def test_truncated_backward_gives_exact_gradients(arch, include, kind):
    model = tiny_model(arch, dtype=torch.float64)
    assert backward_start(model, _layers(model, include))[0] == kind
    examples = make_examples(5, seed=3)
    ref, _ = slow_gradients(model, examples, include=include, include_bias=False)
    S = fi.exact_scores(
        model,
        batches_of(examples[:2], 2),
        batches_of(examples, 3),
        config=fi.ProjectionConfig(include=include, include_bias=False),
        method="dense",
    )
    assert rel_err(S, ref[:2] @ ref.T) < 1e-10


def test_nothing_below_the_lowest_captured_block_is_differentiated():
    model = tiny_model("llama")
    layers = _layers(model, [r"layers\.1\."])
    seen = {}
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: seen.__setitem__("emb", out.requires_grad))

    def block0(_m, _i, out):
        seen["block0"] = (out[0] if isinstance(out, tuple) else out).requires_grad

    model.model.layers[0].register_forward_hook(block0)
    with frozen_for_capture(model, layers):
        fi.GradientExtractor(model, fi.ProjectionConfig(include=[r"layers\.1\."], rank_in=4, rank_out=4)).extract(
            batches_of(make_examples(2), 2)
        )
    assert seen == {"emb": False, "block0": False}


def test_features_and_model_unchanged_by_where_the_backward_starts(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ex = fi.GradientExtractor(model, fi.ProjectionConfig(include=[r"layers\.1\.mlp"], rank_in=8, rank_out=8))
    batches = batches_of(make_examples(4, seed=5), 2, "left")
    fast = ex.extract(batches)
    assert hooks == {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    monkeypatch.setattr(capture, "backward_start", lambda m, _layers: ("embeddings", m.get_input_embeddings()))
    full = ex.extract(batches)
    assert rel_err(fast.data, full.data) < 1e-12
