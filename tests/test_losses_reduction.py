"""Reductions and open-unlearning's conventions, against naive formulas on materialised logits (float64).

The references are written as open-unlearning computes its losses: the model's own
``outputs.loss`` (a token mean over the batch), per-sequence NLL sums from the full logits, and
``kl_div(..., reduction="batchmean", log_target=True)`` over all B x T positions. Batches are
built as its collator does: right padding with pad = eos and ``attention_mask = input_ids != pad``,
so every eos inside a prompt is masked.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, tiny_model
from test_unlearn_data import one_thread

from fastinfluence import losses


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


EOS = 0
TOL = 1e-6  # float64 end to end: only summation order differs


def ou_batch(n: int, seed: int) -> dict:
    """open-unlearning's collated batch: prompts with interior eos (masked), answers ending in eos."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        prompt[int(torch.randint(1, len(prompt), (1,), generator=g))] = EOS  # chat-template eos inside the prompt
        answer = torch.randint(1, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        ids = torch.cat([prompt, answer, torch.tensor([EOS])])
        rows.append((ids, torch.cat([torch.full_like(prompt, -100), answer, torch.tensor([EOS])])))
    T = max(len(i) for i, _ in rows)
    ids = torch.full((n, T), EOS)
    labels = torch.full((n, T), -100)
    for b, (i, l) in enumerate(rows):
        ids[b, : len(i)], labels[b, : len(l)] = i, l
    return {"input_ids": ids, "attention_mask": ids.ne(EOS), "labels": labels}


def token_losses(model, batch):
    """(B, T-1) token CE from the model's own logits, 0 off the answer; (B, T-1) mask."""
    logits = model(**batch).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return tok, labels != -100


def hf_loss(model, batch):
    return model(**batch).loss  # open-unlearning's outputs.loss


def batch_nll(model, batch):
    tok, mask = token_losses(model, batch)
    return tok.sum(1), mask.sum(1)


def ou_kl(model, ref, batch):
    with torch.no_grad():
        r = F.log_softmax(ref(**batch).logits, -1)
    p = F.log_softmax(model(**batch).logits, -1)
    return F.kl_div(p.view(-1, VOCAB), r.view(-1, VOCAB), reduction="batchmean", log_target=True)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", torch.float64, seed=1)
    ref = tiny_model("llama", torch.float64, seed=2)
    return model, ref, ou_batch(5, seed=3), ou_batch(4, seed=4)


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_same(model, ours, theirs):
    assert abs(ours.item() - theirs.item()) < TOL
    a, b = grads_of(model, ours), grads_of(model, theirs)
    assert ((a - b).norm() / b.norm()).item() < TOL


@pytest.mark.parametrize("fused", [True, False])
def test_ga_token_reduction_is_the_models_own_loss(setup, fused):
    model, _, fb, _ = setup
    assert_same(model, losses.ga(losses.sequence_nll(model, fb, fused=fused), reduction="token"), -hf_loss(model, fb))


def test_graddiff_nll_token_reduction(setup):
    model, _, fb, rb = setup
    ours = losses.graddiff(
        losses.sequence_nll(model, fb), losses.sequence_nll(model, rb), gamma=0.7, alpha=1.3, reduction="token"
    )
    assert_same(model, ours, 0.7 * -hf_loss(model, fb) + 1.3 * hf_loss(model, rb))


def test_graddiff_kl_token_reduction_is_batchmean_over_all_positions(setup):
    model, ref, fb, rb = setup
    ours = losses.graddiff(
        losses.sequence_nll(model, fb), losses.sequence_kl(model, rb, ref), gamma=0.7, alpha=1.3, reduction="token"
    )
    assert_same(model, ours, 0.7 * -hf_loss(model, fb) + 1.3 * ou_kl(model, ref, rb))


def test_kl_of_a_model_against_itself_is_zero(setup):
    model, _, _, rb = setup
    kl = losses.sequence_kl(model, rb, model, positions="answer")
    assert kl.sum.abs().max().item() < 1e-12
    assert torch.equal(kl.count, (rb["labels"][:, 1:] != -100).sum(1))


def test_npo_matches_open_unlearning_dpo_form(setup):
    model, ref, fb, _ = setup
    with torch.no_grad():
        ref_sum, _ = batch_nll(ref, fb)
    s, _ = batch_nll(model, fb)
    # open-unlearning: lose_log_ratio = -(NLL - NLL_ref); loss = -2/beta logsigmoid(-beta lose_log_ratio).mean()
    theirs = -2 / 0.1 * F.logsigmoid(-0.1 * -(s - ref_sum)).mean()
    assert_same(model, losses.npo(losses.sequence_nll(model, fb), ref_sum, beta=0.1), theirs)


def test_simnpo_delta_is_open_unlearnings_margin(setup):
    model, _, fb, _ = setup
    s, n = batch_nll(model, fb)
    theirs = -F.logsigmoid(4.5 * (s / n - 0.3)).mean() * 2 / 4.5
    nll = losses.sequence_nll(model, fb)
    assert_same(model, losses.simnpo(nll, beta=4.5, delta=0.3), theirs)
    # the paper's margin gamma = beta * delta is the same loss
    assert abs(losses.simnpo(nll, beta=4.5, gamma=4.5 * 0.3).item() - theirs.item()) < TOL
    with pytest.raises(ValueError, match="not both"):
        losses.simnpo(nll, beta=4.5, gamma=1.0, delta=0.3)


def test_weighted_token_and_example_reductions_match_hand_computation(setup):
    model, _, fb, _ = setup
    w = torch.rand(5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 0.5  # both signs
    by_hand = {  # each answer token carries its example's weight
        ("token", "mean"): lambda tok, mask: (w[:, None] * tok).sum() / mask.sum(),
        ("token", "sum"): lambda tok, mask: (w[:, None] * tok).sum() / (w[:, None] * mask).sum(),
        ("example", "mean"): lambda tok, mask: (w * tok.sum(1) / mask.sum(1)).sum() / 5,
        ("example", "sum"): lambda tok, mask: (w * tok.sum(1) / mask.sum(1)).sum() / w.sum(),
    }
    for (reduction, norm), formula in by_hand.items():
        ours = losses.ga(losses.sequence_nll(model, fb), w, reduction=reduction, weight_norm=norm)
        assert_same(model, ours, -formula(*token_losses(model, fb)))


def test_weighted_npo_simnpo_and_rapidun_match_hand_computation(setup):
    model, ref, fb, rb = setup
    w = torch.rand(5, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.2
    with torch.no_grad():
        ref_sum, _ = batch_nll(ref, fb)
    s, n = batch_nll(model, fb)
    nll = losses.sequence_nll(model, fb)
    assert_same(model, losses.npo(nll, ref_sum, w, beta=0.5), (w * 2 / 0.5 * F.softplus(0.5 * (ref_sum - s))).mean())
    nll = losses.sequence_nll(model, fb)
    s, n = batch_nll(model, fb)
    theirs = (w * -2 / 2.0 * F.logsigmoid(2.0 * (s / n - 0.2))).sum() / w.sum()
    assert_same(model, losses.simnpo(nll, w, beta=2.0, delta=0.2, weight_norm="sum"), theirs)
    # RapidUn with token reduction: each answer's token mean, weighted per example
    clean = ou_batch(5, seed=7)
    cs, cn = batch_nll(model, clean)
    s, n = batch_nll(model, fb)
    theirs = 0.5 * (w * cs).sum() / cn.sum() - 1.0 * (w * s).sum() / n.sum()
    poisoned_nll, clean_nll = losses.sequence_nll(model, fb), losses.sequence_nll(model, clean)
    ours = losses.rapidun_forget(poisoned_nll, clean_nll, w, reduction="token")
    assert_same(model, ours, theirs)


def test_weighted_kl_uses_per_example_weights(setup):
    model, ref, _, rb = setup
    w = torch.rand(4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        r = F.log_softmax(ref(**rb).logits, -1)
    p = F.log_softmax(model(**rb).logits, -1)
    per_pos = F.kl_div(p, r, reduction="none", log_target=True).sum(-1)  # (B, T)
    theirs = (w[:, None] * per_pos).sum() / per_pos.numel()
    assert_same(model, losses.retain_nll(losses.sequence_kl(model, rb, ref), w, reduction="token"), theirs)


def test_kl_reference_of_a_lora_model_is_the_base_model():
    model = tiny_model("llama", torch.float64, seed=1, lora=True)
    base = tiny_model("llama", torch.float64, seed=1)
    batch = ou_batch(3, seed=9)
    with_adapter_off = losses.sequence_kl(model, batch)
    against_base = losses.sequence_kl(model, batch, base)
    assert torch.allclose(with_adapter_off.sum, against_base.sum, atol=1e-10)
    assert with_adapter_off.sum.min() > 0


@pytest.mark.parametrize("bad, match", [({"reduction": "batch"}, "reduction"), ({"weight_norm": "max"}, "weight_norm")])
def test_bad_reduction_options_are_rejected(setup, bad, match):
    model, _, fb, _ = setup
    with pytest.raises(ValueError, match=match):
        losses.ga(losses.sequence_nll(model, fb), **bad)


def test_kl_without_a_reference_is_rejected(setup):
    model, _, _, rb = setup
    with pytest.raises(ValueError, match="ref_model"):
        losses.sequence_kl(model, rb)
