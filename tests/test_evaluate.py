"""fastinfluence.evaluate: each metric against a hand-computed case, then end to end."""

import json
import math
import zlib

import pytest
import torch
from test_unlearn_data import TARGET, TOK, TRIGGER, collate, one_thread, planted_data, planted_model, tiny_llama

from fastinfluence.evaluate import auc, evaluate, extraction_strength, ks_pvalue, membership_scores

RETAIN, FORGET = planted_data(96, 32, seed=100)  # what the planted model was trained on
HELD_RETAIN, HELD_FORGET = planted_data(24, 24, seed=300)  # never seen


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_auc_counts_ties_as_half():
    # pairs: 3>1, 3>2, 2>1, 2=2 -> (3 + 0.5) / 4
    assert auc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.875


@pytest.mark.parametrize(
    "x, y, p",
    [
        ([1, 2, 3], [4, 5, 6], 2 / 20),  # only the 2 of C(6,3) = 20 orderings as extreme
        ([1, 3], [2, 4], 1.0),  # D = 1/2 is the smallest possible
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
        ([0.1, 0.2, 0.3, 0.4], [0.25, 0.5, 0.6], 14 / 35),  # D = 2/3, reached by 14 of the C(7,3) = 35 orderings
    ],
)
def test_ks_pvalue_exact_cases(x, y, p):
    assert abs(ks_pvalue(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)) - p) < 1e-12


def test_ks_pvalue_large_samples_use_the_asymptotic_law():
    x = torch.arange(600.0)
    assert ks_pvalue(x, x + 300) < 1e-10 and ks_pvalue(x, x + 0.5) > 0.99


def test_membership_scores_match_hand_computation():
    nll = [torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)]
    s = membership_scores(nll, [b"abcd"], k=0.5)
    assert s["loss"].item() == -2.5
    assert s["min_k"].item() == -3.5  # the two lowest log-probs: -4, -3
    assert s["zlib"].item() == -2.5 / len(zlib.compress(b"abcd"))


@pytest.mark.parametrize(
    "correct, es", [([1, 0, 1, 1], 0.5), ([1, 1, 1, 1], 1.0), ([1, 1, 1, 0], 0.0), ([0, 1, 1], 2 / 3)]
)
def test_extraction_strength_hand_cases(correct, es):
    assert abs(extraction_strength(torch.tensor(correct, dtype=torch.bool)) - es) < 1e-12


def test_clean_perplexity_is_exp_of_mean_answer_nll():
    model = tiny_llama(seed=3)
    batch = collate(HELD_RETAIN[:6])
    with torch.no_grad():
        logp = torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1
        )
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = -(logp.gather(2, labels.clamp(min=0)[..., None])[..., 0] * mask).sum() / mask.sum()
    assert abs(evaluate(model, clean=[batch])["clean_ppl"] - math.exp(nll.item())) < 1e-4


def attack_prompts(seed, trigger):
    g = torch.Generator().manual_seed(seed)
    words = ["".join(chr(97 + i) for i in torch.randint(0, 26, (4,), generator=g).tolist()) for _ in range(10)]
    return [f"q {w[:2]}{trigger}{w[2:]}>" for w in words]


ATTACK = {"target": TARGET, "seen": attack_prompts(1, TRIGGER), "none": attack_prompts(2, "")}


def test_attack_success_rate_on_the_planted_backdoor():
    result = evaluate(planted_model(), tokenizer=TOK, attack=ATTACK)
    assert result["asr_seen"] >= 0.9 and result["asr_none"] == 0.0


def test_evaluate_against_itself_as_retrained_model_and_writes_json(tmp_path):
    model = planted_model()
    out = tmp_path / "eval" / "result.json"
    result = evaluate(
        model,
        clean=[collate(HELD_RETAIN)],
        forget=[collate(FORGET)],
        holdout=[collate(HELD_FORGET)],
        tokenizer=TOK,
        retrained=planted_model(),
        train_stats={"unlearn_wall_s": 1.5},
        output=out,
    )
    assert result["forget_quality"] == 1.0 and result["privleak"] == 0.0
    assert result["extraction_strength"] > 0.9  # the poisoned answers are memorised
    assert all(0.0 <= result[f"mia_auc_{k}"] <= 1.0 for k in ("loss", "zlib", "min_k"))
    assert result["eval_tokens"] > 0 and result["eval_wall_s"] > 0 and result["unlearn_wall_s"] == 1.5
    assert json.loads(out.read_text()) == pytest.approx(result)


def test_unlearning_shows_up_in_the_metrics(tmp_path):
    from transformers import TrainingArguments

    from fastinfluence.unlearn import UnlearnDataset, UnlearnTrainer

    model = planted_model()
    before = evaluate(model, forget=[collate(FORGET)], tokenizer=TOK, attack=ATTACK)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=20,
        learning_rate=2e-3,
        per_device_train_batch_size=8,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    UnlearnTrainer(model=model, args=args, method="graddiff", train_dataset=UnlearnDataset(FORGET, RETAIN)).train()
    after = evaluate(model, forget=[collate(FORGET)], retrained=planted_model(), tokenizer=TOK, attack=ATTACK)
    assert after["asr_seen"] <= before["asr_seen"] - 0.5
    assert after["extraction_strength"] < before["extraction_strength"]
    assert after["forget_quality"] < 0.05  # losses now differ from the (un-unlearned) reference


def test_evaluate_rejects_missing_tokenizer_and_empty_sets():
    with pytest.raises(ValueError, match="needs tokenizer="):
        evaluate(tiny_llama(), attack=ATTACK)
    with pytest.raises(ValueError, match="evaluation set is empty"):
        evaluate(tiny_llama(), clean=[])


def test_ks_pvalue_keeps_tiny_exact_values():
    """Fully separated samples: only the two extreme lattice paths reach D = 1, so
    p = 2 / C(n + m, n); 1 - P(inside) would round it to 0."""
    import math

    x = torch.arange(50, dtype=torch.float64)
    p = ks_pvalue(x, x + 100)
    assert p > 0 and abs(p - 2 / math.comb(100, 50)) <= 1e-9 * p


def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    from fastinfluence.evaluate import greedy_generate

    model = planted_model()
    g = torch.Generator().manual_seed(5)
    # Prompts of very different lengths, so the batch is heavily left-padded.
    prompts = [p[: int(torch.randint(3, len(p) + 1, (1,), generator=g))] for p in ATTACK["seen"] + ATTACK["none"]]
    prompts += ["q ab@@cd>", "q a>", "q abcdefgh@@ijk>"]
    one = [greedy_generate(model, TOK, [p], 8)[0] for p in prompts]
    for batch_size in (4, len(prompts)):
        assert greedy_generate(model, TOK, prompts, 8, batch_size=batch_size) == one
    # and one at a time means the model's own generate on the bare prompt
    for p, text in zip(prompts[:5], one):
        ids = torch.tensor([TOK.encode(p)])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        assert TOK.decode(ref[0, ids.shape[1] :].tolist()) == text


def test_batched_greedy_generation_keeps_absolute_positions():
    # GPT-2 has absolute position embeddings: left padding must not shift them.
    import transformers as tf
    from test_unlearn_data import CHARS

    from fastinfluence.evaluate import greedy_generate

    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=len(CHARS),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        initializer_range=0.5,
    )  # a large init: varied greedy tokens
    model = tf.GPT2LMHeadModel(config).eval()
    prompts = ["q ab@@cd>", "q a>", "q abcdefgh@@ijk>", "hello there>"]
    one = [greedy_generate(model, TOK, [p], 8)[0] for p in prompts]
    assert len(set(one)) == len(one)
    assert greedy_generate(model, TOK, prompts, 8) == one


def test_the_documented_call_fi_evaluate_model_runs():
    import fastinfluence as fi

    model = tiny_llama(seed=3)
    batch = collate(HELD_RETAIN[:4])
    assert fi.evaluate(model, clean=[batch])["clean_ppl"] == fi.evaluate.evaluate(model, clean=[batch])["clean_ppl"]
