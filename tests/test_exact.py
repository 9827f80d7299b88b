"""exact_scores equals per-example gradients computed the slow way (one backward per example)."""

import pytest
import torch
from helpers import ARCHS, batches_of, make_examples, rel_err, slow_gradients, tiny_model

from fastinfluence import ProjectionConfig, exact_scores

# float64: only summation order differs from the slow path (measured ~1e-15); float32: a
# few ulps of each per-token product accumulated over ~100 terms and two layers.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_scores_match_slow_gradients(arch, dtype):
    model = tiny_model(arch, dtype)
    queries, train = make_examples(3, seed=1), make_examples(7, seed=2)
    Gq, _ = slow_gradients(model, queries)
    Gt, _ = slow_gradients(model, train)
    ref = Gq @ Gt.T
    for method in ("ghost", "dense", "auto"):
        out = exact_scores(model, batches_of(queries, 2, "left"), batches_of(train, 3), method=method)
        assert out.shape == (3, 7) and out.dtype == dtype
        assert rel_err(out, ref) <= TOL[dtype], method


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_scores_lora(dtype):
    model = tiny_model("llama", dtype, lora=True)
    queries, train = make_examples(2, seed=3), make_examples(5, seed=4)
    Gq, layers = slow_gradients(model, queries)
    assert layers and all("lora_" in l.name for l in layers)  # default selection: trainable = LoRA
    Gt, _ = slow_gradients(model, train)
    out = exact_scores(model, batches_of(queries, 2), batches_of(train, 2, "left"))
    assert rel_err(out, Gq @ Gt.T) <= TOL[dtype]


def test_cosine_and_layer_selection():
    model = tiny_model("gpt2", torch.float64)
    queries, train = make_examples(2, seed=5), make_examples(4, seed=6)
    cfg = ProjectionConfig(include=[r"mlp\.c_fc"], include_bias=False)
    Gq, layers = slow_gradients(model, queries, include=cfg.include, include_bias=False)
    Gt, _ = slow_gradients(model, train, include=cfg.include, include_bias=False)
    assert [l.name for l in layers] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    ref = (Gq @ Gt.T) / Gq.norm(dim=1)[:, None] / Gt.norm(dim=1)[None, :]
    out = exact_scores(model, batches_of(queries, 2), batches_of(train, 4), config=cfg, metric="cosine")
    assert rel_err(out, ref) <= 1e-10


def test_bad_arguments():
    model = tiny_model("llama")
    ex = make_examples(2)
    with pytest.raises(ValueError, match="metric"):
        exact_scores(model, batches_of(ex, 2), batches_of(ex, 2), metric="l2")
    with pytest.raises(ValueError, match="method"):
        exact_scores(model, batches_of(ex, 2), batches_of(ex, 2), method="fast")


@pytest.mark.parametrize("method", ["ghost", "dense"])
def test_cosine_with_bias_both_methods(method):
    # the norms are computed only for the cosine: check them on both paths, bias included
    model = tiny_model("gpt2", torch.float64, seed=8)
    queries, train = make_examples(3, seed=9), make_examples(4, seed=10)
    cfg = ProjectionConfig(include=[r"attn\.c_attn", r"mlp\.c_proj"])
    Gq, _ = slow_gradients(model, queries, include=cfg.include)
    Gt, _ = slow_gradients(model, train, include=cfg.include)
    ref = (Gq @ Gt.T) / Gq.norm(dim=1)[:, None] / Gt.norm(dim=1)[None, :]
    out = exact_scores(
        model, batches_of(queries, 2, "left"), batches_of(train, 3), config=cfg, metric="cosine", method=method
    )
    assert rel_err(out, ref) <= 1e-10


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_bf16_autocast_exact_scores_close_to_float32(arch, metric):
    """autocast="bfloat16": the forward, per-example gradients and their dots in bfloat16 (float32
    accumulation). Each value carries 8 mantissa bits (relative 2^-9), compounded over a few
    layers' forward and backward: measured 0.2-0.3% here against float32; 2% bounds it, where
    unrelated scores give O(1). Both methods, the model handed back untouched."""
    model = tiny_model(arch, torch.float32, seed=7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    queries, train = batches_of(make_examples(3, seed=8), 2, "left"), batches_of(make_examples(6, seed=9), 4)
    ref = exact_scores(model, queries, train, metric=metric)
    for method in ("ghost", "dense"):
        low = exact_scores(model, queries, train, ProjectionConfig(autocast="bfloat16"), metric=metric, method=method)
        assert low.dtype == torch.float32 and low.shape == ref.shape
        err = rel_err(low, ref)
        assert 0 < err < 0.02, (method, err)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for wrong in (torch.float64, torch.bfloat16):  # autocast lowers float32 matmuls only
        with pytest.raises(ValueError, match="float32 model"):
            exact_scores(tiny_model(arch, wrong), queries, train, ProjectionConfig(autocast="bfloat16"))


# ----------------------------------------------------------------------------- the LM head captured


def _head_model(tied: bool, bias: bool):
    from test_lm_head_features import _untied_copy

    model = tiny_model("qwen2", torch.float64)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.get_input_embeddings().weight
    if bias:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(model.lm_head.out_features, dtype=torch.float64) * 0.1)
    return model, (_untied_copy(model) if tied else model)


@pytest.mark.parametrize(
    "tied, bias, include, metric",
    [
        (False, False, [r"lm_head"], "dot"),
        (True, False, [r"lm_head"], "cosine"),
        (False, True, [r"lm_head", r"layers\.1\.mlp\.up"], "cosine"),
        (True, False, [r"lm_head", r"layers\.0\.self_attn\.q"], "dot"),
    ],
    ids=["untied", "tied-cosine", "biased+block-cosine", "tied+block"],
)
def test_exact_scores_with_the_head_captured_never_form_its_logits(tied, bias, include, metric, monkeypatch):
    """The head's products come from its labelled tokens over vocabulary chunks: equal in float64 to
    per-example gradients formed the slow way and to the hooked (B, T, V) path (method='dense'), with
    padding on both sides and prompt tokens in every example; the head module itself never runs."""
    from fastinfluence.ops import lm_head_grad

    monkeypatch.setattr(lm_head_grad, "GHOST_CHUNK_ELEMENTS", 200)  # several vocabulary chunks
    model, untied = _head_model(tied, bias)
    queries, train = make_examples(3, seed=6, min_len=4), make_examples(5, seed=7, min_len=4)
    config = ProjectionConfig(include=include)
    Gq, layers = slow_gradients(untied, queries, include=include)
    Gt, _ = slow_gradients(untied, train, include=include)
    assert "lm_head" in [l.name for l in layers]
    ref = Gq @ Gt.T
    if metric == "cosine":
        ref = ref / Gq.norm(dim=1)[:, None] / Gt.norm(dim=1)[None, :]
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    out = exact_scores(model, batches_of(queries, 2, "left"), batches_of(train, 3, "right"), config, metric=metric)
    handle.remove()
    assert calls == []  # no B x T x V logits
    assert rel_err(out, ref) <= 1e-10
    hooked = exact_scores(model, batches_of(queries, 2), batches_of(train, 2, "left"), config, metric, method="dense")
    assert rel_err(out, hooked) <= 1e-10
