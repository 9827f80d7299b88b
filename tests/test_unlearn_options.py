"""UnlearnTrainer's loss options (reduction, forget coefficient, KL retain loss, SimNPO delta):
the same losses as open-unlearning's trainers, written out on materialised logits (float64)."""

import copy

import open_unlearning_rendition as ou
import pytest
import torch
from helpers import VOCAB, tiny_model
from test_unlearn_data import one_thread
from transformers import TrainingArguments

from fastinfluence import losses
from fastinfluence.unlearn import UnlearnCollator, UnlearnDataset, UnlearnTrainer


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


TOL = 1e-6


def examples(n, seed):
    return [{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist()} for e in ou.qa_items(n, seed, VOCAB)]


FORGET, RETAIN = examples(4, seed=1), examples(8, seed=2)


def make(model, tmp_path, method, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        save_strategy="no",
        disable_tqdm=True,
    )
    return UnlearnTrainer(
        model=model, args=args, method=method, train_dataset=UnlearnDataset(FORGET, RETAIN, ratio=2), **kwargs
    )


def inputs():
    return UnlearnCollator()([UnlearnDataset(FORGET, RETAIN, ratio=2)[i] for i in range(3)])


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    "method, theirs, kwargs",
    [
        ("graddiff", "GradDiff", {"gamma": 0.7, "alpha": 1.3}),
        ("graddiff", "GradDiff", {"gamma": 0.7, "alpha": 1.3, "retain_loss_type": "KL"}),
        ("simnpo", "SimNPO", {"gamma": 0.125, "alpha": 1.0, "beta": 4.5, "delta": 0.3}),
    ],
    ids=["graddiff", "graddiff_kl", "simnpo"],
)
def test_token_reduction_gives_open_unlearnings_losses(method, theirs, kwargs, tmp_path):
    model = tiny_model("llama", torch.float64, seed=3)
    before = copy.deepcopy(model)
    trainer = make(model, tmp_path, method, reduction="token", **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)  # move away from the KL reference
    batch = inputs()
    ours, ref = trainer.compute_loss(model, batch), ou.loss(theirs, model, before, batch, **kwargs)
    assert abs(ours.item() - ref.item()) < TOL
    a, b = grads(model, ours), grads(model, ref)
    assert ((a - b).norm() / b.norm()).item() < TOL


def test_forget_coefficient_scales_every_method(tmp_path):
    model = tiny_model("llama", torch.float64, seed=4)
    batch = inputs()
    one = make(model, tmp_path, "simnpo", alpha=0.0).compute_loss(model, batch)
    two = make(model, tmp_path, "simnpo", alpha=0.0, gamma=2.0).compute_loss(model, batch)
    assert abs(two.item() - 2 * one.item()) < 1e-12


def test_example_reduction_stays_the_default(tmp_path):
    model = tiny_model("llama", torch.float64, seed=5)
    batch = inputs()
    f, r = losses.sequence_nll(model, batch["forget"]), losses.sequence_nll(model, batch["retain"])
    expected = -f.mean.mean() + r.mean.mean()
    assert abs(make(model, tmp_path, "graddiff").compute_loss(model, batch).item() - expected.item()) < 1e-12


def test_kl_reference_is_a_frozen_copy_that_training_leaves_unchanged(tmp_path):
    model = tiny_model("llama", torch.float32, seed=6)
    start = copy.deepcopy(model.state_dict())
    trainer = make(model, tmp_path, "graddiff", retain_loss_type="KL")
    trainer.train()
    assert all(torch.equal(start[k], v) for k, v in trainer.ref_model.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_kl_reference_of_lora_training_is_the_base_model(tmp_path):
    from peft import LoraConfig

    model = tiny_model("llama", torch.float64, seed=7)
    base = copy.deepcopy(model)
    trainer = make(
        model,
        tmp_path,
        "graddiff",
        retain_loss_type="KL",
        gamma=0.0,
        lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.ref_model is None
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    batch = inputs()
    kl = losses.retain_nll(losses.sequence_kl(trainer.model, batch["retain"], base), reduction="example")
    assert kl.item() > 0
    assert abs(trainer.compute_loss(trainer.model, batch).item() - kl.item()) < 1e-10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction": "mean"}, "reduction"),
        ({"retain_loss_type": "kl"}, "retain_loss_type"),
        ({"weight_norm": "none"}, "weight_norm"),
    ],
)
def test_bad_loss_options_are_rejected_at_construction(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        make(tiny_model("llama", seed=8), tmp_path, "graddiff", **kwargs)
