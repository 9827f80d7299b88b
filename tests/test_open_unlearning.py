"""fastinfluence.integrations.open_unlearning against a local rendition of open-unlearning's contract."""

import copy
import json
import math

import open_unlearning_rendition as ou
import pytest
import torch
from helpers import OLD_TRANSFORMERS, VOCAB, tiny_model
from test_unlearn_data import one_thread
from transformers import TrainingArguments

from fastinfluence.integrations import open_unlearning as oul


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# float64 model: only summation order differs (float32 references before transformers 4.46: relative)
TOL = 1e-6


@pytest.fixture(scope="module")
def data():
    return ou.qa_items(6, seed=1, vocab=VOCAB), ou.qa_items(5, seed=2, vocab=VOCAB)


def make(name, model, forget, retain, tmp_path, base=ou.UnlearnTrainer, eval_dataset=None, **method_args):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        remove_unused_columns=False,
        max_steps=2,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    cls = oul.trainers(base)[name]
    # as open-unlearning's load_trainer calls it: every argument by keyword, then **method_args
    return cls(
        model=model,
        train_dataset=ou.ForgetRetainDataset(forget, retain),
        eval_dataset=eval_dataset,
        data_collator=ou.collator(),
        args=args,
        evaluators=None,
        template_args=None,
        **method_args,
    )


def batch(forget, retain, rows=(0, 3, 5, 1)):
    return ou.collator()([{"forget": forget[i], "retain": retain[i % len(retain)]} for i in rows])


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_same(model, ours, theirs):
    assert abs(ours.item() - theirs.item()) < TOL * max(1.0, abs(theirs.item()))
    a, b = grads(model, ours), grads(model, theirs)
    assert ((a - b).norm() / b.norm()).item() < TOL


def test_module_imports_without_open_unlearning_and_says_how_to_use_it():
    try:
        import trainer.unlearn.base  # noqa: F401

        pytest.skip("an open-unlearning checkout is importable here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="install /path/to/open-unlearning"):
        oul.FIGradDiff  # noqa: B018


def test_classes_build_lazily_on_open_unlearnings_base_and_register_by_name(monkeypatch):
    ou.install_as_modules(monkeypatch)
    from fastinfluence.integrations.open_unlearning import FIGradDiff

    assert issubclass(FIGradDiff, ou.UnlearnTrainer) and issubclass(FIGradDiff, ou.FinetuneTrainer)
    registry = {}
    oul.register(lambda cls: registry.__setitem__(cls.__name__, cls))  # open-unlearning's _register_trainer
    assert sorted(registry) == sorted(oul.SPECS)
    assert registry["FIGradDiff"] is FIGradDiff


@pytest.mark.parametrize(
    "handler, theirs, method_args",
    [
        ("FIGradAscent", "GradAscent", {}),
        ("FIGradDiff", "GradDiff", {"gamma": 0.7, "alpha": 1.3}),
        ("FIGradDiff", "GradDiff", {"gamma": 0.7, "alpha": 1.3, "retain_loss_type": "KL"}),
        ("FINPO", "NPO", {"beta": 0.1, "alpha": 1.0, "gamma": 1.0}),
        ("FINPO", "NPO", {"beta": 0.5, "alpha": 0.5, "gamma": 2.0, "retain_loss_type": "KL"}),
        ("FISimNPO", "SimNPO", {"delta": 0.0, "beta": 4.5, "alpha": 1.0, "gamma": 0.125}),
        ("FISimNPO", "SimNPO", {"delta": 0.4, "beta": 2.5, "alpha": 1.0, "gamma": 0.125}),
    ],
    ids=["ga", "graddiff", "graddiff_kl", "npo", "npo_kl", "simnpo", "simnpo_delta"],
)
def test_losses_equal_open_unlearnings_own(handler, theirs, method_args, data, tmp_path):
    model = tiny_model("llama", torch.float64, seed=3)
    before = copy.deepcopy(model)  # open-unlearning's reference model
    trainer = make(handler, model, *data, tmp_path, **method_args)
    perturb(model)  # the reference (cached NLL, KL copy) is the model before training
    inputs = batch(*data)
    assert_same(model, trainer.compute_loss(model, inputs), ou.loss(theirs, model, before, inputs, **method_args))


@pytest.mark.skipif(OLD_TRANSFORMERS, reason="transformers before 4.46: GPT-2 in float64 overflows on a masked token")
def test_npo_ratio_is_one_at_the_first_step_with_masked_eos_in_prompts(data, tmp_path):
    """The cached reference and the policy see the same positions although the cache collates
    other batches (pad = eos masks an eos inside every prompt)."""
    model = tiny_model("gpt2", torch.float64, seed=4)
    trainer = make("FINPO", model, *data, tmp_path, beta=0.1, alpha=0.0)
    loss = trainer.compute_loss(model, batch(*data, rows=(5, 2, 0)))
    assert abs(loss.item() - 2 / 0.1 * math.log(2.0)) < 1e-9  # softplus(0) = log 2 per example


def write_weights(tmp_path, **lists):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(lists))
    return str(path)


def test_weights_are_looked_up_by_the_batch_index(data, tmp_path):
    forget, retain = data
    model = tiny_model("llama", torch.float64, seed=5)
    g = torch.Generator().manual_seed(6)
    fw, rw = torch.rand(6, generator=g, dtype=torch.float64) * 2, torch.rand(5, generator=g, dtype=torch.float64) * 2
    trainer = make(
        "FIGradDiff",
        model,
        forget,
        retain,
        tmp_path,
        gamma=0.7,
        alpha=1.3,
        weights_path=write_weights(tmp_path, forget=fw.tolist(), retain=rw.tolist()),
    )
    inputs = batch(forget, retain)
    f, r = inputs["forget"], inputs["retain"]

    def by_hand():  # each answer token carries its example's weight; token mean over the batch
        def weighted_token_mean(b, w):
            return (w[b["index"]] * ou.batch_nll(model, b)).sum() / (b["labels"][:, 1:] != -100).sum()

        return -0.7 * weighted_token_mean(f, fw) + 1.3 * weighted_token_mean(r, rw)

    assert_same(model, trainer.compute_loss(model, inputs), by_hand())


def test_imu_is_a_weighted_average_of_per_example_losses(data, tmp_path):
    forget, retain = data
    model = tiny_model("llama", torch.float64, seed=7)
    w = torch.tensor([0.0, 1.5, 0.3, 2.0, 0.0, 0.7], dtype=torch.float64)
    trainer = make("FIIMU", model, forget, retain, tmp_path, weights_path=write_weights(tmp_path, forget=w.tolist()))
    f = batch(forget, retain)["forget"]

    def by_hand():  # IMU: -sum(w l) / sum(w), l the per-example mean CE
        l = ou.batch_nll(model, f) / (f["labels"][:, 1:] != -100).sum(1)
        return -(w[f["index"]] * l).sum() / w[f["index"]].sum()

    assert_same(model, trainer.compute_loss(model, {"forget": f}), by_hand())
    skipped = ou.collator()([{"forget": forget[i]} for i in (0, 4)])  # weight 0: nothing to unlearn
    assert trainer.compute_loss(model, skipped).item() == 0.0


def test_rapidun_uses_the_alternate_answer_as_the_clean_one(tmp_path):
    forget, retain = ou.qa_items(4, seed=8, vocab=VOCAB, alternate=True), ou.qa_items(4, seed=9, vocab=VOCAB)
    model = tiny_model("llama", torch.float64, seed=10)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    trainer = make(
        "FIRapidUn", model, forget, retain, tmp_path, alpha=0.0, weights_path=write_weights(tmp_path, forget=w.tolist())
    )
    inputs = batch(forget, retain, rows=(2, 0, 3))
    poisoned, clean = inputs["forget"]["original"], inputs["forget"]["alternate"]

    def by_hand():
        wi = w[poisoned["index"]]

        def tm(b):
            return (wi * ou.batch_nll(model, b)).sum() / (b["labels"][:, 1:] != -100).sum()

        return 0.5 * tm(clean) - 1.0 * tm(poisoned)

    assert_same(model, trainer.compute_loss(model, inputs), by_hand())


def test_rapidun_refuses_a_forget_set_without_alternate_answers(data, tmp_path):
    with pytest.raises(ValueError, match="yields no 'alternate'.*rapidun_without_clean=true"):
        make("FIRapidUn", tiny_model("llama", torch.float64, seed=10), *data, tmp_path)


def test_rapidun_without_clean_by_name_is_graddiff(data, tmp_path):
    model = tiny_model("llama", torch.float64, seed=10)
    inputs = batch(*data)
    ours = make("FIRapidUn", model, *data, tmp_path, rapidun_without_clean=True).compute_loss(model, inputs)
    assert_same(model, ours, make("FIGradDiff", model, *data, tmp_path).compute_loss(model, inputs))


BASES = {"base": ou.UnlearnTrainer, "base_after_pr175": ou.DispatchingUnlearnTrainer}


@pytest.mark.parametrize("base", list(BASES))
def test_an_hf_eval_dataset_gets_the_models_own_loss(data, tmp_path, base):
    if base == "base_after_pr175" and OLD_TRANSFORMERS:
        pytest.skip("open-unlearning's PR #175 base class passes num_items_in_batch: transformers 4.46 and later")
    forget, retain = data
    model = tiny_model("llama", torch.float64, seed=12)
    trainer = make("FIGradDiff", model, forget, retain, tmp_path, base=BASES[base], eval_dataset=retain)
    got = trainer.evaluate()["eval_loss"]
    with torch.no_grad():
        theirs = model(**ou.model_batch(ou.collator()(retain[:4]))).loss  # the first eval batch of 4
        rest = model(**ou.model_batch(ou.collator()(retain[4:]))).loss
    assert abs(got - (4 * theirs.item() + rest.item()) / 5) < TOL


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(oul.SPECS))
def test_every_trainer_computes_its_unlearning_loss_through_either_base(base, name):
    cls = oul.trainers(BASES[base])[name]
    assert cls.compute_unlearn_loss is oul._InfluenceLossTrainer.compute_unlearn_loss
    if base == "base_after_pr175":  # the base class's own dispatch is kept
        assert cls.compute_loss is ou.DispatchingUnlearnTrainer.compute_loss


def test_low_influence_keep_list_drops_the_skipped_examples_from_the_forget_split(data, tmp_path):
    forget, retain = data
    path = write_weights(tmp_path, keep=[5, 0, 2], n=6, forget=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    trainer = make("FIGradDiff", tiny_model("llama", seed=14), forget, retain, tmp_path, weights_path=path)
    assert len(trainer.train_dataset) == 3 and len(forget) == 6  # the user's dataset is left whole
    seen = []
    loss = trainer.compute_unlearn_loss

    def recording(model, inputs, *args, **kwargs):
        seen.extend(inputs["forget"]["index"].tolist())
        return loss(model, inputs, *args, **kwargs)

    trainer.compute_unlearn_loss = recording
    trainer.train()  # max_steps=2, batch 4: every kept example once per step, no skipped one
    assert sorted(seen) == [0, 0, 2, 2, 5, 5]
    with pytest.raises(ValueError, match="'keep' indexes 4 forget examples but 'forget' has 2"):
        oul.load_weights(write_weights(tmp_path, keep=[0], n=4, forget=[1.0, 2.0]))


def test_training_runs_through_the_trainer_with_open_unlearnings_pipeline(data, tmp_path):
    model = tiny_model("llama", torch.float32, seed=11)
    start = [p.detach().clone() for p in model.parameters()]
    trainer = make(
        "FINPO",
        model,
        *data,
        tmp_path,
        beta=0.1,
        retain_loss_type="KL",
        weights_path=write_weights(tmp_path, forget=[1.0] * 6),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


@pytest.mark.parametrize(
    "args, match",
    [
        ({"weights_path": "/nonexistent/w.json"}, "does not exist"),
        ({"reduction": "batch"}, "reduction"),
        ({"retain_loss_type": "L2"}, "retain_loss_type"),
        ({"router_aux_loss": -1.0}, "router_aux_loss"),
    ],
)
def test_bad_method_args_are_rejected_when_the_trainer_is_built(args, match, data, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make("FIGradDiff", tiny_model("llama", seed=12), *data, tmp_path, **args)


def test_weights_of_another_split_and_batches_without_index_are_rejected(data, tmp_path):
    forget, retain = data
    with pytest.raises(ValueError, match="has 3 forget weights but the forget set has 6"):
        make(
            "FIGradDiff",
            tiny_model("llama", seed=13),
            forget,
            retain,
            tmp_path,
            weights_path=write_weights(tmp_path, forget=[1.0, 1.0, 1.0]),
        )
    with pytest.raises(ValueError, match="needs weights_path"):
        make("FIIMU", tiny_model("llama", seed=13), forget, retain, tmp_path)
    trainer = make(
        "FIGradDiff",
        tiny_model("llama", seed=13),
        forget,
        retain,
        tmp_path,
        weights_path=write_weights(tmp_path, forget=[1.0] * 6),
    )
    without_index = ou.DataCollatorForSupervisedDataset(ou.collator().tokenizer)
    no_index = without_index([{"forget": forget[0], "retain": retain[0]}])
    with pytest.raises(ValueError, match="DataCollatorForSupervisedDatasetwithIndex"):
        trainer.compute_loss(trainer.model, no_index)


def test_install_copies_the_configs_and_registers_once(tmp_path):
    init = tmp_path / "src" / "trainer" / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text("TRAINER_REGISTRY = {}\n\ndef _register_trainer(cls):\n    TRAINER_REGISTRY[cls.__name__] = cls\n")
    oul.install(tmp_path)
    oul.install(tmp_path)
    assert init.read_text().count("_register_fastinfluence(_register_trainer)") == 1
    names = {p.stem for p in (tmp_path / "configs" / "trainer").glob("*.yaml")}
    assert names == set(oul.SPECS)
    assert (tmp_path / "configs" / "experiment" / "unlearn" / "tofu" / "fastinfluence_weighted.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="not an open-unlearning checkout"):
        oul.install(tmp_path / "elsewhere")


def test_npo_refuses_an_index_its_reference_cache_never_saw(data, tmp_path):
    forget, retain = data
    trainer = make("FINPO", tiny_model("llama", seed=14), forget, retain, tmp_path)
    stranger = dict(forget[0], index=9)
    with pytest.raises(ValueError, match="never saw"):
        trainer.compute_loss(trainer.model, ou.collator()([{"forget": stranger, "retain": retain[0]}]))
