"""The LM head captured without B x T x V: its projected G, its loss and the input gradient for the
blocks below come from one walk over the vocabulary; features equal the path that hooks the model's
own logits, alone or beside other layers, tied or untied, softcapped, with either padding."""

import pytest
import torch
import transformers as tf
from helpers import VOCAB, batches_of, make_examples, rel_err, slow_gradients, tiny_model

import fastinfluence as fi
from fastinfluence import capture
from fastinfluence.ops.lm_head_grad import head_loss_projected, lm_head_loss_grad_projected


def _head_inputs(dtype, bias, seed=7):
    g = torch.Generator().manual_seed(seed)
    N, H, V, k = 37, 12, 53, 5
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    P = torch.randn(V, k, generator=g, dtype=dtype)
    return hidden, weight, b, labels, P


def _reference(hidden, weight, b, labels, softcap):
    """Per-token loss, d loss / d hidden and d loss / d z from materialised logits (plain autograd)."""
    hidden = hidden.detach().requires_grad_(True)
    z = hidden @ weight.T + (b if b is not None else 0)
    z.retain_grad()
    logits = z if softcap is None else softcap * torch.tanh(z / softcap)
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    ce.sum().backward()
    return ce.detach(), hidden.grad, z.grad


@pytest.mark.parametrize("softcap,bias", [(None, False), (3.0, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_op_equals_autograd_on_materialised_logits(softcap, bias, dtype, tol):
    hidden, weight, b, labels, P = _head_inputs(dtype, bias)
    loss_ref, dh_ref, G = _reference(hidden, weight, b, labels, softcap)
    loss, dh, GP = lm_head_loss_grad_projected(hidden, weight, labels, P, bias=b, softcap=softcap)
    assert rel_err(loss, loss_ref) < tol and rel_err(dh, dh_ref) < tol and rel_err(GP, G @ P) < tol
    assert torch.all(GP[::4] == 0) and torch.all(dh[::4] == 0)


def test_backward_scales_the_forward_input_gradient_by_any_upstream():
    """Signed, non-uniform per-token upstream gradients (a weighted or ascent loss) reach ``hidden``
    exactly: the head's logits are never recomputed."""
    hidden, weight, b, labels, P = _head_inputs(torch.float64, True, seed=3)
    up = torch.randn(len(labels), dtype=torch.float64)
    x = hidden.clone().requires_grad_(True)
    loss, GP = head_loss_projected(x, weight, labels, P, bias=b, softcap=2.5)
    assert not GP.requires_grad
    (loss * up).sum().backward()
    ref = hidden.clone().requires_grad_(True)
    z = ref @ weight.T + b
    ce = torch.nn.functional.cross_entropy(2.5 * torch.tanh(z / 2.5), labels, ignore_index=-100, reduction="none")
    (ce * up).sum().backward()
    assert rel_err(x.grad, ref.grad) < 1e-12


# ----------------------------------------------------------------------------- through extraction


def _features(model, config, batches, fused: bool, monkeypatch, **kw):
    """Features with the fused head (the default) or with the head hooked on the model's own logits."""
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(capture, "fused_head", lambda _model: None)
        ex = fi.GradientExtractor(model, config)
        assert (ex.capture.fused is not None) == fused
        return ex.extract(batches, **kw)


HEAD_AND_BLOCK = [r"lm_head", r"layers\.1\.mlp"]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("include", [[r"lm_head"], HEAD_AND_BLOCK], ids=["head", "head+block"])
def test_fused_head_features_equal_the_hooked_logits_path(side, include, monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    config = fi.ProjectionConfig(include=include, rank_in=8, rank_out=16, dtype="float64")
    batches = batches_of(make_examples(5, seed=11), 2, side)
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    fast = _features(model, config, batches, True, monkeypatch, tokens=True, covariances=True)
    handle.remove()
    assert calls == []  # the head module never ran: no B x T x V logits
    ref = _features(model, config, batches, False, monkeypatch, tokens=True, covariances=True)
    assert rel_err(fast.data, ref.data) < 1e-12 and fast.ids == ref.ids
    for name in ref.tokens.g:
        assert rel_err(fast.tokens.g[name], ref.tokens.g[name]) < 1e-12
        assert rel_err(fast.stats[name][1], ref.stats[name][1]) < 1e-12


def test_fused_head_features_with_a_softcapped_biased_head(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    model.config.final_logit_softcapping = 2.0  # read by the fused loss; the hooked path applies it below
    head = model.lm_head
    head.bias = torch.nn.Parameter(torch.randn(VOCAB, dtype=torch.float64) * 0.1)
    forward = model.forward

    def softcapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    monkeypatch.setattr(model, "forward", softcapped)
    config = fi.ProjectionConfig(include=HEAD_AND_BLOCK, rank_in=8, rank_out=16, dtype="float64")
    batches = batches_of(make_examples(4, seed=2), 2, "left")
    fast = _features(model, config, batches, True, monkeypatch)
    ref = _features(model, config, batches, False, monkeypatch)
    assert rel_err(fast.data, ref.data) < 1e-12


# ----------------------------------------------------------------------------- tied heads


def _untied_copy(model):
    """The same model with its head's weight a copy of the embeddings: its head gradient is the tied
    weight's head share."""
    copy = tf.AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa").to(torch.float64)
    copy.load_state_dict(model.state_dict())
    copy.config.tie_word_embeddings = False
    copy.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return copy.eval()


def test_a_tied_head_named_in_include_is_captured_as_its_share(monkeypatch, caplog):
    model = tiny_model("qwen2", dtype=torch.float64)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    caplog.set_level("INFO", logger="fastinfluence.capture")
    config = fi.ProjectionConfig(include=[r"lm_head"], rank_in=8, rank_out=8, dtype="float64")
    ex = fi.GradientExtractor(model, config)
    assert [l.tied for l in ex.layers] == [True] and "captured as this module's share" in caplog.text
    assert ex.fingerprint["layers"][0][-1] == "tied share"
    examples = make_examples(4, seed=5)
    batches = batches_of(examples, 2, "right")
    exact = fi.exact_scores(model, batches, batches, config=config)
    grads, _ = slow_gradients(_untied_copy(model), examples, include=[r"lm_head"])
    assert rel_err(exact, grads @ grads.T) < 1e-10
    fast = _features(model, config, batches, True, monkeypatch)
    ref = _features(model, config, batches, False, monkeypatch)
    assert rel_err(fast.data, ref.data) < 1e-12


def test_a_tied_head_is_left_out_of_the_default_selection_with_a_line(caplog):
    caplog.set_level("INFO", logger="fastinfluence.capture")
    layers = fi.GradientExtractor(tiny_model("gpt2")).layers
    assert "lm_head" not in [l.name for l in layers]
    assert "lm_head: weight tied to another module, not captured by default" in caplog.text


def test_a_tied_head_beside_other_included_layers_is_captured_in_module_order():
    ex = fi.GradientExtractor(tiny_model("gpt2"), fi.ProjectionConfig(include=[r"lm_head", r"h\.1\.mlp\.c_fc"]))
    assert [(l.name, l.tied) for l in ex.layers] == [("transformer.h.1.mlp.c_fc", False), ("lm_head", True)]
