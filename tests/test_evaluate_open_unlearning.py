"""evaluate's TOFU truth ratio and open-unlearning's eos convention, against its formulas on the model's logits."""

import math

import open_unlearning_rendition as ou
import pytest
import torch
import torch.nn.functional as F
from helpers import OLD_TRANSFORMERS, REFERENCE_RTOL, VOCAB, tiny_model
from test_unlearn_data import one_thread

from fastinfluence import evaluate as ev


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def batches(items, size=3):
    return [ou.model_batch(ou.collator()(items[s : s + size])) for s in range(0, len(items), size)]


def avg_loss(model, items):
    """open-unlearning's evaluate_probability: per-example mean answer NLL."""
    out = []
    with torch.no_grad():
        for b in batches(items):
            out.append(ou.batch_nll(model, b) / (b["labels"] != -100).sum(-1))
    return torch.cat(out)


def with_answers(questions, seed):
    """The same prompts as ``questions`` with other answers (paraphrased or perturbed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for q in questions:
        prompt = q["input_ids"][q["labels"] == -100]
        answer = torch.randint(1, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        ids = torch.cat([prompt, answer, torch.tensor([ou.EOS])])
        labels = torch.cat([torch.full_like(prompt, -100), answer, torch.tensor([ou.EOS])])
        out.append({"input_ids": ids, "labels": labels, "index": q["index"]})
    return out


@pytest.fixture(scope="module")
def tofu():
    questions = ou.qa_items(7, seed=1, vocab=VOCAB)
    para = with_answers(questions, seed=2)
    pert = [with_answers(questions, seed=10 + j) for j in range(3)]
    return para, pert


def test_truth_ratio_matches_open_unlearnings_formula(tofu):
    para, pert = tofu
    model = tiny_model("llama", torch.float64, seed=3)
    correct = torch.exp(-avg_loss(model, para))
    wrong = torch.exp(-torch.stack([avg_loss(model, p) for p in pert]).mean(0))  # aggregate_to_1D, then exp
    theirs = wrong / (correct + 1e-10)
    ours = ev.truth_ratio(model, batches(para), [batches(p) for p in pert])
    theirs = theirs.to(ours.dtype)  # float32 with transformers before 4.46 (helpers.OLD_TRANSFORMERS)
    assert torch.allclose(ours, theirs, rtol=REFERENCE_RTOL, atol=0)
    summary = torch.minimum(theirs, 1 / (theirs + 1e-10)).mean().item()  # closer_to_1_better
    assert abs(ev.truth_ratio_summary(ours) - summary) < (1e-5 if OLD_TRANSFORMERS else 1e-12)


def test_forget_quality_uses_truth_ratios_when_answers_are_given(tofu):
    para, pert = tofu
    model, retrained = tiny_model("llama", torch.float64, seed=3), tiny_model("llama", torch.float64, seed=4)
    forget = batches(ou.qa_items(7, seed=1, vocab=VOCAB))
    out = ev.evaluate(
        model, forget=forget, retrained=retrained, paraphrased=batches(para), perturbed=[batches(p) for p in pert]
    )
    expected = ev.ks_pvalue(
        ev.truth_ratio(model, batches(para), [batches(p) for p in pert]),
        ev.truth_ratio(retrained, batches(para), [batches(p) for p in pert]),
    )
    assert out["forget_quality"] == expected
    assert "forget_quality_loss" in out and 0 < out["forget_truth_ratio"] <= 1
    with pytest.raises(ValueError, match="both paraphrased= and perturbed="):
        ev.evaluate(model, forget=forget, paraphrased=batches(para))
    with pytest.raises(ValueError, match="perturbed set 0 has 3 answers"):
        ev.truth_ratio(model, batches(para), [batches(pert[0][:3])])


def their_min_k(model, items, k):
    """open-unlearning's MinKProbAttack score on tokenwise_logprobs (the final labelled token left out)."""
    out = []
    with torch.no_grad():
        for b in batches(items):
            logp = F.log_softmax(model(**b).logits, -1)[:, :-1]
            target = logp.gather(2, b["input_ids"][:, 1:, None]).squeeze(-1)
            for i in range(len(b["labels"])):
                idx = (b["labels"][i] != -100).nonzero(as_tuple=True)[0][:-1]
                lp = target[i, idx[0] - 1 : idx[-1]] if len(idx) else target.new_zeros(0)
                out.append(0.0 if lp.numel() == 0 else -lp.sort().values[: max(1, int(len(lp) * k))].mean().item())
    return torch.tensor(out, dtype=torch.float64)


def test_exclude_final_eos_gives_open_unlearnings_min_k():
    model = tiny_model("llama", torch.float64, seed=5)
    model.config.eos_token_id = ou.EOS
    forget, holdout = ou.qa_items(6, seed=6, vocab=VOCAB), ou.qa_items(6, seed=7, vocab=VOCAB)
    out = ev.evaluate(model, forget=batches(forget), holdout=batches(holdout), min_k=0.4, exclude_final_eos=True)
    # open-unlearning's score is an NLL (lower = member); ours a log-prob (higher = member)
    assert out["mia_auc_min_k"] == ev.auc(-their_min_k(model, forget, 0.4), -their_min_k(model, holdout, 0.4))
    nll, ids = ev._tokens(model, batches(forget))
    ours = torch.stack([ev.min_k_score(t, 0.4) for t in ev.drop_final_eos(nll, ids, ou.EOS)])
    theirs = -their_min_k(model, forget, 0.4).to(ours.dtype)
    assert torch.allclose(ours, theirs, rtol=REFERENCE_RTOL, atol=1e-12)
    plain = ev.evaluate(model, forget=batches(forget), holdout=batches(holdout), min_k=0.4)
    assert plain["mia_auc_loss"] == out["mia_auc_loss"]  # loss and zlib keep every token


def their_extraction_strength(preds, labels):
    """open-unlearning's loop: the first k whose suffix greedy decoding reproduces."""
    n = len(labels)
    for k in range(n):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 1 - k / n


@pytest.mark.parametrize("seed", range(6))
def test_extraction_strength_matches_open_unlearning_when_a_suffix_is_reproduced(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 9, (1,), generator=g))
    labels = torch.randint(0, 5, (n,), generator=g)
    preds = torch.where(torch.rand(n, generator=g) < 0.5, labels, (labels + 1) % 5)
    preds[-1] = labels[-1]  # some suffix matches: the case both define alike
    assert math.isclose(ev.extraction_strength(preds == labels), their_extraction_strength(preds, labels))


def test_extraction_strength_without_eos_and_of_an_empty_answer():
    assert ev.extraction_strength(torch.tensor([True, False, True, True])) == 0.5
    assert ev.extraction_strength(torch.tensor([], dtype=torch.bool)) == 0.0
    assert ev.drop_final_eos([torch.arange(3.0)], [torch.tensor([5, 6, 0])], 0)[0].tolist() == [0.0, 1.0]
    assert ev.drop_final_eos([torch.arange(3.0)], [torch.tensor([5, 6, 7])], 0)[0].tolist() == [0.0, 1.0, 2.0]


def test_exclude_final_eos_needs_an_eos_id():
    model = tiny_model("llama", torch.float64, seed=5)
    model.config.eos_token_id = None
    with pytest.raises(ValueError, match="eos token id"):
        ev.evaluate(model, forget=batches(ou.qa_items(2, seed=6, vocab=VOCAB)), exclude_final_eos=True)
