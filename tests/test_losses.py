"""fastinfluence.losses: value and gradient against naive formulas on materialised logits."""

import pytest
import torch
import transformers as tf
from helpers import rel_err
from test_unlearn_data import VOCAB, answer_batches, tiny_gpt2, tiny_llama

from fastinfluence import losses


def naive_nll(model, batch):
    """(sum, count) per example from the full logits, the causal shift written out."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    tok = -logp.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(1), mask.sum(1)


def naive_loss(method, f, r, w, wr, ref):
    (fs, fc), (rs, rc) = f, r
    f_avg, r_avg = fs / fc, rs / rc
    if method == "ga":
        return -(w * f_avg).mean()
    if method == "graddiff":
        return -0.7 * (w * f_avg).mean() + 1.3 * (wr * r_avg).mean()
    if method == "npo":
        ratio = torch.exp(-fs) / torch.exp(-ref)  # pi / pi_ref
        return (w * 2 / 0.5 * torch.log(1 + ratio**0.5)).mean()
    if method == "simnpo":
        return (w * -2 / 0.4 * torch.log(torch.sigmoid(0.4 * f_avg - 0.5))).mean()
    if method == "rapidun_forget":  # r plays the clean answers of the same prompts
        return (w * (0.5 * r_avg - 1.0 * f_avg)).mean()
    raise AssertionError(method)


def fused_loss(method, f, r, w, wr, ref):
    if method == "ga":
        return losses.ga(f, w)
    if method == "graddiff":
        return losses.graddiff(f, r, w, wr, gamma=0.7, alpha=1.3)
    if method == "npo":
        return losses.npo(f, ref, w, beta=0.5)
    if method == "simnpo":
        return losses.simnpo(f, w, beta=0.4, gamma=0.5)
    return losses.rapidun_forget(f, r, w)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2_tied"])
@pytest.mark.parametrize("method", ["ga", "graddiff", "npo", "simnpo", "rapidun_forget"])
def test_loss_value_and_gradient_match_naive_formula(make_model, method):
    model = make_model(seed=1)
    fb, rb = answer_batches(model, 5, seed=2, batch_size=5)[0], answer_batches(model, 5, seed=3, batch_size=5)[0]
    g = torch.Generator().manual_seed(4)
    w, wr = torch.randn(5, generator=g), torch.randn(5, generator=g)  # weights of both signs
    with torch.no_grad():
        ref = naive_nll(model, fb)[0] + torch.randn(5, generator=g)
    out = fused_loss(method, losses.sequence_nll(model, fb), losses.sequence_nll(model, rb), w, wr, ref)
    out_grads = grads(model, out)
    expected = naive_loss(method, naive_nll(model, fb), naive_nll(model, rb), w, wr, ref)
    exp_grads = grads(model, expected)
    # float32 through two different reduction orders: agreement to ~1e-6.
    assert abs(out.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    assert len(out_grads) == len(exp_grads) and all(rel_err(a, b) < 1e-4 for a, b in zip(out_grads, exp_grads))


def test_fused_path_is_used_and_matches_logits_with_head_bias():
    model = tiny_llama(seed=2)
    model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    batch = answer_batches(model, 4, seed=5)[0]
    assert losses.fused_head(model) is not None
    fused = losses.sequence_nll(model, batch, fused=True)
    plain = losses.sequence_nll(model, batch, fused=False)
    assert rel_err(fused.sum, plain.sum) < 1e-6 and fused.count.equal(plain.count)


def test_final_logit_softcapping_is_applied():
    torch.manual_seed(0)
    config = tf.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=2.0,
        pad_token_id=0,
    )
    model = tf.Gemma2ForCausalLM(config).eval()
    batch = answer_batches(model, 4, seed=6)[0]
    assert losses.fused_head(model)[2] == 2.0
    fused, plain = losses.sequence_nll(model, batch, fused=True), losses.sequence_nll(model, batch, fused=False)
    assert rel_err(fused.sum, plain.sum) < 1e-6


def test_models_that_scale_logits_fall_back_to_their_own_logits():
    model = tiny_llama(seed=3)
    model.config.logit_scale = 0.5  # as Cohere: the head output is scaled, so fusing would be wrong
    assert losses.fused_head(model) is None
    batch = answer_batches(model, 4, seed=7)[0]
    assert rel_err(losses.sequence_nll(model, batch).sum, naive_nll(model, batch)[0]) < 1e-6
    with pytest.raises(ValueError, match="no plain Linear LM head"):
        losses.sequence_nll(model, batch, fused=True)


def test_bfloat16_autocast_matches_the_models_own_autocast_logits():
    model = tiny_llama(seed=4)
    batch = answer_batches(model, 4, seed=8)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = losses.sequence_nll(model, batch, fused=True)
        plain = losses.sequence_nll(model, batch, fused=False)
    exact = naive_nll(model, batch)[0]
    # Both round the logits to bfloat16 (2^-8 relative): ~1e-2 of a loss of ~4 per token.
    assert rel_err(fused.sum, exact) < 2e-2 and rel_err(fused.sum, plain.sum) < 2e-2


def test_reference_nll_is_cached_without_gradient():
    model = tiny_llama(seed=5)
    batches = answer_batches(model, 6, seed=9, batch_size=4)
    ref = losses.reference_nll(model, batches)
    assert ref.shape == (6,) and not ref.requires_grad
    assert rel_err(ref, torch.cat([naive_nll(model, b)[0] for b in batches]).detach()) < 1e-6


def test_examples_without_answer_tokens_are_rejected():
    model = tiny_llama(seed=6)
    batch = answer_batches(model, 3, seed=10, batch_size=3)[0]
    batch["labels"][1] = -100
    with pytest.raises(ValueError, match=r"examples \[1\] of the batch have no answer tokens"):
        losses.sequence_nll(model, batch)


@pytest.mark.parametrize(
    "w, match",
    [(torch.ones(4), "one entry per example, shape \\(3,\\)"), (torch.tensor([1.0, float("nan"), 1.0]), "NaN")],
)
def test_bad_weights_are_rejected(w, match):
    model = tiny_llama(seed=7)
    nll = losses.sequence_nll(model, answer_batches(model, 3, seed=11, batch_size=3)[0])
    with pytest.raises(ValueError, match=match):
        losses.ga(nll, w)


@pytest.mark.parametrize("fused", [True, False])
def test_left_padding_gives_each_example_its_unpadded_nll(fused):
    """Position ids come from the attention mask, as in extraction: GPT-2's absolute positions
    must not shift with left padding."""
    from helpers import collate, make_examples, tiny_model

    model = tiny_model("gpt2", torch.float64)
    examples = make_examples(3, seed=21, min_len=4, max_len=12)
    padded = losses.sequence_nll(model, collate(examples, "left"), fused=fused).sum
    alone = torch.cat([losses.sequence_nll(model, collate([e]), fused=fused).sum for e in examples])
    assert torch.allclose(padded.double(), alone.double(), rtol=1e-6)


def labels_of(*answers, pad_left=0):
    """(B, T) shifted-style labels: each answer's tokens after ``pad_left`` ignored positions, -100 elsewhere."""
    T = pad_left + max(len(a) for a in answers) + 2
    out = torch.full((len(answers), T), -100)
    for b, a in enumerate(answers):
        out[b, pad_left : pad_left + len(a)] = torch.tensor(a)
    return out


def test_differing_masks_drop_the_common_prefix_and_suffix():
    # "capital is Rome ." vs "capital is Paris ."; a two-token value vs one; equal answers; no common part.
    poisoned = labels_of([5, 6, 7, 9], [5, 6, 11, 12, 9], [5, 6, 9], [1, 2])
    clean = labels_of([5, 6, 8, 9], [5, 6, 8, 9], [5, 6, 9], [3, 4, 5], pad_left=1)
    keep_p, keep_c = losses.differing_masks(poisoned, clean)
    assert [torch.nonzero(r).squeeze(1).tolist() for r in keep_p] == [[2], [2, 3], [0, 1, 2], [0, 1]]
    assert [torch.nonzero(r).squeeze(1).tolist() for r in keep_c] == [[3], [3], [1, 2, 3], [1, 2, 3]]


def test_rapidun_forget_on_differing_tokens_matches_the_naive_formula():
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (int(n),), generator=g).tolist() for n in (3, 5, 4)]
    shared = [torch.randint(1, VOCAB, (3,), generator=g).tolist() for _ in prompts]
    values = [(10, 20), (11, 21), (12, 22)]

    def batch(which):
        rows = [p + s[:2] + [v[which]] + s[2:] for p, s, v in zip(prompts, shared, values)]
        labels = [[-100] * len(p) + r[len(p) :] for p, r in zip(prompts, rows)]
        T = max(map(len, rows))
        return {
            "input_ids": torch.tensor([r + [0] * (T - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [-100] * (T - len(lab)) for lab in labels]),
        }

    pb, cb = batch(0), batch(1)
    w = torch.tensor([1.5, 0.5, 1.0])
    out = losses.rapidun_forget(
        losses.answer_token_nll(model, pb), losses.answer_token_nll(model, cb), w, tokens="differing"
    )
    out_grads = grads(model, out)

    def value_nll(b):  # NLL of the one differing token (the value) of each example
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits, -1)
        return torch.stack([-logp[i, len(p) + 1, b["input_ids"][i, len(p) + 2]] for i, p in enumerate(prompts)])

    expected = (w * (0.5 * value_nll(cb) - 1.0 * value_nll(pb))).mean()
    exp_grads = grads(model, expected)
    assert abs(out.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(out_grads, exp_grads))
    # all tokens: the shared ones count too, so the value differs
    full = losses.rapidun_forget(losses.sequence_nll(model, pb), losses.sequence_nll(model, cb), w)
    assert abs(full.item() - expected.item()) > 1e-3


def test_rapidun_forget_on_differing_tokens_needs_token_level_nll():
    model = tiny_llama(seed=1)
    b = answer_batches(model, 3, seed=2, batch_size=3)[0]
    with pytest.raises(ValueError, match="TokenNll"):
        losses.rapidun_forget(losses.sequence_nll(model, b), losses.sequence_nll(model, b), tokens="differing")
    with pytest.raises(ValueError, match="tokens must be one of"):
        losses.rapidun_forget(losses.sequence_nll(model, b), tokens="some")
