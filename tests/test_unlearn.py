"""UnlearnTrainer on a tiny Llama with a planted backdoor (see test_unlearn_data)."""

import math

import pytest
import torch
from test_unlearn_data import collate, one_thread, planted_data, planted_model
from transformers import TrainingArguments

from fastinfluence import losses, weights
from fastinfluence.unlearn import UnlearnCollator, UnlearnDataset, UnlearnTrainer

RETAIN, FORGET = planted_data(96, 32, seed=100)  # the data the planted model was trained on
HELD_OUT, _ = planted_data(48, 0, seed=200)  # clean prompts never seen


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def forget_nll(model) -> float:
    """Mean CE of the poisoned answers of the forget set."""
    with torch.no_grad():
        return losses.sequence_nll(model.eval(), collate(FORGET)).mean.mean().item()


def retain_ppl(model) -> float:
    """Perplexity of the clean answers of held-out prompts."""
    with torch.no_grad():
        nll = losses.sequence_nll(model.eval(), collate(HELD_OUT))
    return math.exp(nll.sum.sum().item() / nll.count.sum().item())


def make_trainer(model, tmp_path, method="graddiff", steps=10, lr=1e-3, dataset=None, **kwargs):
    args_kw = {
        k: kwargs.pop(k)
        for k in list(kwargs)
        if k in ("bf16", "gradient_accumulation_steps", "optim", "weight_decay", "per_device_train_batch_size")
    }
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=steps,
        seed=0,
        **({"per_device_train_batch_size": 8} | args_kw),
    )
    return UnlearnTrainer(
        model=model, args=args, method=method, train_dataset=dataset or UnlearnDataset(FORGET, RETAIN), **kwargs
    )


def train(model, tmp_path, **kwargs):
    trainer = make_trainer(model, tmp_path, **kwargs)
    trainer.train()
    return trainer


def test_planted_model_starts_with_the_backdoor_and_a_good_retain_perplexity():
    model = planted_model()
    assert forget_nll(model) < 0.05 and retain_ppl(model) < 1.1


# Bound: the forget CE rises from ~0.001 to above 0.5 nats per token (the poisoned answer
# is e^0.5 times less likely per token), while the held-out retain perplexity (1.02 before)
# stays below 1.3.
@pytest.mark.parametrize("method", ["ga", "graddiff", "npo", "simnpo", "rapidun"])
def test_each_method_lowers_forget_likelihood_and_keeps_retain_perplexity(method, tmp_path):
    model = planted_model()
    trainer = train(model, tmp_path, method=method)
    assert forget_nll(model) > 0.5
    assert retain_ppl(model) < 1.3
    logged = trainer.state.log_history[0]
    assert "forget_loss" in logged and logged["tokens"] > 0
    assert ("retain_loss" in logged) == (method != "ga")


def test_loss_reweighting_during_training_unlearns(tmp_path):
    model = planted_model()
    trainer = train(model, tmp_path, method="graddiff", loss_reweight_tau=0.5)
    assert forget_nll(model) > 0.5 and retain_ppl(model) < 1.3
    assert trainer.loss_reweight_tau == 0.5


def test_zero_weight_forget_examples_contribute_no_gradient(tmp_path):
    # IMU zeroes the weights of examples with positive influence: they must not move the model.
    model = planted_model()
    trainer = make_trainer(model, tmp_path, method="ga")
    collator = trainer.data_collator

    def grads(ds):
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, collator([ds[i] for i in range(len(ds))])).backward()
        return [p.grad.clone() for p in model.parameters()]

    four = grads(UnlearnDataset(FORGET[:4], RETAIN, forget_weights=torch.tensor([2.0, 0.5, 0.0, 0.0])))
    two = grads(UnlearnDataset(FORGET[:2], RETAIN, forget_weights=torch.tensor([2.0, 0.5])))
    # The loss is a mean over the batch: 4 examples with two zero weights give half the gradient.
    for a, b in zip(four, two):
        assert torch.allclose(a, 0.5 * b, rtol=1e-4, atol=1e-9)


def test_bf16_autocast_training_unlearns(tmp_path):
    model = planted_model()
    trainer = train(model, tmp_path, method="graddiff", bf16=True)
    assert forget_nll(model) > 0.5 and retain_ppl(model) < 1.3
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    def ds():
        return UnlearnDataset(FORGET, RETAIN, forget_weights=torch.rand(32, generator=torch.Generator().manual_seed(0)))

    big, small = planted_model(), planted_model()
    train(big, tmp_path / "a", steps=1, lr=0.05, optim="sgd", dataset=ds(), per_device_train_batch_size=8)
    train(
        small,
        tmp_path / "b",
        steps=1,
        lr=0.05,
        optim="sgd",
        dataset=ds(),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    start = planted_model()
    for (n, a), b, s in zip(big.named_parameters(), small.parameters(), start.parameters()):
        step = (a - s).detach()
        assert ((b - s).detach() - step).norm() <= 1e-4 * step.norm() + 1e-9, n


def test_npo_caches_reference_log_probs_before_training(tmp_path):
    model = planted_model()
    expected = losses.reference_nll(model, [collate(FORGET)])
    trainer = train(model, tmp_path, method="npo", steps=3)
    assert torch.allclose(trainer.ref_nll, expected, rtol=1e-5, atol=1e-6)
    assert losses.reference_nll(model, [collate(FORGET)]).mean() > 2 * trainer.ref_nll.mean()


def test_lora_leaves_the_base_weights_bitwise_unchanged(tmp_path):
    from peft import LoraConfig

    model = planted_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = train(
        model, tmp_path, lr=1e-2, lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    peft_model = trainer.model
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert forget_nll(peft_model) > 0.5
    trainer.save_model(str(tmp_path / "adapter"))
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved


def test_simu_masks_leave_every_unmasked_parameter_bitwise_unchanged(tmp_path):
    model = planted_model()
    masks = weights.simu_mask(
        model, [collate(FORGET[:16])], [collate(RETAIN[:16])], forget_fraction=0.25, retain_fraction=0.25
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tmp_path, lr=1e-2, simu_masks=masks, weight_decay=0.1)
    after = model.state_dict()
    changed = 0
    for name, b in before.items():
        block = name.rsplit(".", 2)[0]
        if block in masks and name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            m = masks[block][:, None] if "down_proj" not in name else masks[block][None, :]
            m = m.expand_as(b)
            assert torch.equal(after[name][~m], b[~m]), name
            changed += int((after[name][m] != b[m]).sum())
        else:
            assert torch.equal(after[name], b), name
    assert changed > 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: UnlearnDataset([], RETAIN), "forget set is empty"),
        (lambda: UnlearnDataset(FORGET, []), "needs a non-empty retain set"),
        (lambda: UnlearnDataset([{"input_ids": [1, 2, 3], "labels": [-100] * 3}], RETAIN), "no answer tokens"),
        (
            lambda: UnlearnDataset(FORGET, RETAIN, forget_weights=torch.ones(5)),
            "forget_weights has 5 entries but there are 32",
        ),
        (lambda: UnlearnDataset(FORGET, RETAIN, retain_weights=-torch.ones(96)), "non-negative"),
        (lambda: UnlearnDataset(FORGET, RETAIN, forget_weights=torch.full((32,), float("nan"))), "finite"),
    ],
)
def test_bad_unlearning_data_is_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_method_and_missing_retain_are_rejected(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="unknown unlearning method 'gd'; choose one of ga, graddiff"):
        UnlearnTrainer(model=planted_model(), args=args, method="gd", train_dataset=UnlearnDataset(FORGET, RETAIN))
    with pytest.raises(ValueError, match="has a retain term"):
        UnlearnTrainer(
            model=planted_model(), args=args, method="npo", train_dataset=UnlearnDataset(FORGET, [], ratio=0)
        )


def test_collator_pairs_each_forget_example_with_ratio_retain_examples():
    ds = UnlearnDataset(FORGET[:4], RETAIN[:10], ratio=3, retain_weights=torch.arange(10.0))
    batch = UnlearnCollator()([ds[i] for i in range(4)])
    assert batch["forget"]["input_ids"].shape[0] == 4 and batch["retain"]["input_ids"].shape[0] == 12
    assert batch["forget"]["index"].tolist() == [0, 1, 2, 3] and batch["forget"]["clean"]["labels"].shape[0] == 4
    # 12 picks cycle through a permutation of the 10 retain examples: each used at least once.
    ids = {tuple(r) for r in batch["retain"]["input_ids"].tolist()}
    assert len(ids) == 10
    assert sorted(set(batch["retain"]["weights"].tolist())) == list(map(float, range(10)))


def test_rapidun_on_differing_tokens_trains_on_the_value_only(tmp_path):
    # Poisoned and clean answers share the template; only the value token differs.
    from test_unlearn_data import example

    forget = [example(f"q {w}@@>", f"IS {w.upper()}.") | {"clean": example(f"q {w}@@>", f"IS {w}.")} for w in "abcd"]
    model = planted_model()
    trainer = make_trainer(
        model, tmp_path, method="rapidun", rapidun_tokens="differing", dataset=UnlearnDataset(forget, RETAIN, ratio=1)
    )
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(model, inputs)
    f, c = (losses.answer_token_nll(model, b) for b in (inputs["forget"], inputs["forget"]["clean"]))
    expected = losses.rapidun_forget(f, c, inputs["forget"]["weights"], tokens="differing")
    expected = expected + losses.retain_nll(losses.sequence_nll(model, inputs["retain"]), inputs["retain"]["weights"])
    assert torch.allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="rapidun_tokens must be one of"):
        make_trainer(planted_model(), tmp_path, method="rapidun", rapidun_tokens="diff")
    with pytest.raises(ValueError, match="'clean' example"):
        no_clean = [{k: v for k, v in e.items() if k != "clean"} for e in forget]
        make_trainer(
            planted_model(),
            tmp_path,
            method="rapidun",
            rapidun_tokens="differing",
            dataset=UnlearnDataset(no_clean, RETAIN),
        )


def _without_clean(examples):
    return [{k: v for k, v in e.items() if k != "clean"} for e in examples]


def test_rapidun_refuses_forget_examples_without_clean_answers(tmp_path):
    forget = FORGET[:2] + _without_clean(FORGET[2:4])
    with pytest.raises(ValueError, match=r"forget examples \[2, 3\] have none: .* rapidun_without_clean=True"):
        make_trainer(planted_model(), tmp_path, method="rapidun", dataset=UnlearnDataset(forget, RETAIN))


def test_rapidun_without_clean_by_name_is_weighted_gradient_ascent(tmp_path):
    model = planted_model()
    data = UnlearnDataset(_without_clean(FORGET[:4]), RETAIN, ratio=1)
    trainer = make_trainer(model, tmp_path, method="rapidun", dataset=data, rapidun_without_clean=True)
    inputs = trainer.data_collator([data[i] for i in range(4)])
    f, r = inputs["forget"], inputs["retain"]
    expected = losses.ga(losses.sequence_nll(model, f), f["weights"])
    expected = expected + losses.retain_nll(losses.sequence_nll(model, r), r["weights"])
    assert torch.allclose(trainer.compute_loss(model, inputs), expected, rtol=1e-6)
