"""InfluenceCallback: features captured in the training step equal post-hoc extraction at the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import collate, make_examples, rel_err, tiny_model
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from fastinfluence import FeatureStore, GradientExtractor, InfluenceCallback, ProjectionConfig
from fastinfluence.callback import interval_stores

EXAMPLES = make_examples(12, seed=3)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, examples, id_key="id"):
        self.examples, self.id_key = examples, id_key

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels, self.id_key: 100 + i}


def _training_args(tmp_path, **overrides) -> TrainingArguments:
    """CPU, no reports, bars or saving, batches of 2: what every Trainer of these tests shares."""
    kw = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        logging_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**{**kw, **overrides})


def _collate(items, id_key="id"):
    batch = collate([(it["input_ids"], it["labels"]) for it in items])
    batch[id_key] = torch.tensor([it[id_key] for it in items])
    return batch


class _Snapshots(TrainerCallback):
    """Weights and Adam moments at the start of every optimizer step (copies keyed by the step that follows):
    ``adam[step][parameter name] = (exp_avg, exp_avg_sq, state step)``, absent before the first update."""

    def __init__(self):
        self.weights, self.adam = {}, {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step + 1] = copy.deepcopy(model.state_dict())
        opt_state = getattr(optimizer, "optimizer", optimizer).state
        self.adam[state.global_step + 1] = {
            n: (opt_state[p]["exp_avg"].clone(), opt_state[p]["exp_avg_sq"].clone(), int(opt_state[p]["step"]))
            for n, p in model.named_parameters()
            if p in opt_state and "exp_avg" in opt_state[p]
        }


def _train(
    model,
    tmp_path,
    config,
    accumulation=2,
    loss_kwargs=None,
    bf16=False,
    steps=3,
    examples=EXAMPLES,
    every=1,
    features=("gradient",),
    window=None,
    **args,
):
    snaps = _Snapshots()
    callback = InfluenceCallback(tmp_path / "features", config, every=every, features=features, window=window)
    targs = _training_args(
        tmp_path,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        bf16=bf16,
        dataloader_num_workers=0,
        **{"lr_scheduler_type": "constant", "learning_rate": 1e-2, **args},
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=_Dataset(examples), data_collator=_collate, callbacks=[snaps, callback]
    )
    if loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = loss_kwargs
    trainer.train()
    return callback, snaps


def _exact(model):
    """GPT-2 in float64 without dropout: training mode computes what eval mode does (Llama's RMSNorm
    rounds through float32, which bounds that comparison at ~1e-7), with a float64 loss."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return _float64_loss(model)


def _float64_loss(model):
    """HF's causal LM loss computes the cross-entropy in float32; this twin keeps float64 so that
    training and extraction can be compared to float64 rounding."""

    def loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, **kwargs):
        logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        return ce / (num_items_in_batch if num_items_in_batch is not None else (labels != ignore_index).sum())

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.loss_function = loss
    return model


def _check_against_extraction(model, tmp_path, config, snaps, tol, steps=None):
    stores = interval_stores(tmp_path / "features")
    assert [s.name for s in stores] == [f"step-{k:08d}" for k in (steps or sorted(snaps.weights))]
    by_id = {100 + i: ex for i, ex in enumerate(EXAMPLES)}
    for path in stores:
        store = FeatureStore.open(path)
        step = int(path.name.split("-")[1])
        assert store.meta["steps"] == [step] * len(store) and store.meta["last_step"] == step
        assert all(lr > 0 for lr in store.meta["lr"])
        model.load_state_dict(snaps.weights[step])
        ref = GradientExtractor(model, config).extract([collate([by_id[i]], ids=[i]) for i in store.ids])
        got = store.to_features()
        assert rel_err(got.data, ref.data) < tol, (path.name, rel_err(got.data, ref.data))


@pytest.mark.parametrize("loss_kwargs", [None, False])  # num_items_in_batch passed to the model, or a micro-batch mean
def test_features_equal_extraction_at_the_same_weights(tmp_path, loss_kwargs):
    model = _exact(tiny_model("gpt2", torch.float64))
    config = ProjectionConfig(rank_in=8, rank_out=8, dtype="float64")
    callback, snaps = _train(model, tmp_path, config, accumulation=2, loss_kwargs=loss_kwargs)
    assert sum(len(FeatureStore.open(p)) for p in interval_stores(tmp_path / "features")) == 3 * 2 * 2
    _check_against_extraction(model, tmp_path, config, snaps, 1e-10)


def test_stock_float32_loss_matches_to_its_rounding(tmp_path):
    model = tiny_model("llama", torch.float64)
    config = ProjectionConfig(rank_in=8, rank_out=8, dtype="float64")
    _, snaps = _train(model, tmp_path, config, accumulation=2, steps=2)
    # HF's training loss computes its cross-entropy in float32, and Llama's RMSNorm rounds through float32.
    _check_against_extraction(model, tmp_path, config, snaps, 1e-6)


def test_lora_features_equal_extraction(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True, init_lora_weights=False)
    model = _exact(get_peft_model(tiny_model("gpt2", torch.float64), lora).double())
    config = ProjectionConfig(rank_in=8, rank_out=8, dtype="float64")
    callback, snaps = _train(model, tmp_path, config, accumulation=1, steps=2)
    assert all("lora_" in l.name for l in callback.extractor.layers)
    _check_against_extraction(model, tmp_path, config, snaps, 1e-10)


def test_bf16_autocast_features_track_float32_extraction(tmp_path):
    model = tiny_model("llama", torch.float32)
    config = ProjectionConfig(rank_in=8, rank_out=8)
    _, snaps = _train(model, tmp_path, config, accumulation=2, bf16=True, steps=1)
    # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 per op); a few percent over a deep product.
    _check_against_extraction(model, tmp_path, config, snaps, 5e-2)


def test_missing_ids_named_with_the_fix(tmp_path):
    model = tiny_model("llama")
    targs = _training_args(tmp_path, output_dir=str(tmp_path / "o"), max_steps=1)
    data = [{"input_ids": ids, "labels": labels} for ids, labels in EXAMPLES]
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data,
        data_collator=lambda items: collate([(d["input_ids"], d["labels"]) for d in items]),
        callbacks=[InfluenceCallback(tmp_path / "f", ProjectionConfig(rank_in=4, rank_out=4))],
    )
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


def test_gradient_checkpointing_is_refused_before_training():
    callback = InfluenceCallback("unused", ProjectionConfig(rank_in=4, rank_out=4))
    for flag in ("gradient_checkpointing", "activation_checkpointing"):
        args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **{flag: True})
        with pytest.raises(ValueError, match="activation_checkpointing / gradient_checkpointing on"):
            callback.on_train_begin(args, None, None, model=tiny_model("llama"))
    with pytest.raises(ValueError, match="factorized"):
        InfluenceCallback("unused", ProjectionConfig(mode="flat"))
    with pytest.raises(ValueError, match="Trainer's bf16=True"):
        InfluenceCallback("unused", ProjectionConfig(rank_in=4, rank_out=4, autocast="bfloat16"))


def test_replaying_a_written_interval_keeps_its_store(tmp_path):
    model = tiny_model("llama", torch.float64)
    start = copy.deepcopy(model.state_dict())
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    _train(model, tmp_path, config, accumulation=1, steps=1)
    path = interval_stores(tmp_path / "features")[0]
    shards = {p: p.stat().st_mtime_ns for p in (path / "shards").iterdir()}
    before = FeatureStore.open(path).to_features().data.clone()
    model.load_state_dict(start)  # a resumed run replays the same step from the same weights
    _train(model, tmp_path, config, accumulation=1, steps=1)
    assert {p: p.stat().st_mtime_ns for p in (path / "shards").iterdir()} == shards
    assert torch.equal(FeatureStore.open(path).to_features().data, before)


def test_one_store_per_trainer_checkpoint_by_default(tmp_path):
    model = _exact(tiny_model("gpt2", torch.float64))
    callback = InfluenceCallback(tmp_path / "features", ProjectionConfig(rank_in=4, rank_out=4))
    targs = _training_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    Trainer(
        model=model, args=targs, train_dataset=_Dataset(EXAMPLES), data_collator=_collate, callbacks=[callback]
    ).train()
    stores = [FeatureStore.open(p) for p in interval_stores(tmp_path / "features")]
    assert [s.path.name for s in stores] == ["step-00000002", "step-00000003"]
    assert [s.meta["steps"] for s in stores] == [[1, 1, 2, 2], [3, 3]]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert not callback._handles and not model._forward_hooks  # hooks removed at the end of training


def test_window_captures_only_the_last_steps_of_each_interval(tmp_path):
    model = _exact(tiny_model("gpt2", torch.float64))
    config = ProjectionConfig(rank_in=8, rank_out=8, dtype="float64")
    _, snaps = _train(model, tmp_path, config, accumulation=1, steps=5, every=3, window=1, lr_scheduler_type="linear")
    stores = [FeatureStore.open(p) for p in interval_stores(tmp_path / "features")]
    assert [s.meta["steps"] for s in stores] == [[3, 3], [5, 5]]  # the last interval ends with training
    lr = {s: 1e-2 * (5 - (s - 1)) / 5 for s in range(1, 6)}  # linear decay, no warmup
    assert [x for s in stores for x in s.meta["lr"]] == pytest.approx([lr[3]] * 2 + [lr[5]] * 2)
    # every step of the interval counts in its mean learning rate, captured or not
    assert [s.meta["interval_lr"] for s in stores] == pytest.approx([(lr[1] + lr[2] + lr[3]) / 3, (lr[4] + lr[5]) / 2])
    _check_against_extraction(model, tmp_path, config, snaps, 1e-10, steps=[3, 5])


def test_window_needs_the_interval_length():
    callback = InfluenceCallback("unused", ProjectionConfig(rank_in=4, rank_out=4), window=2)
    args = TrainingArguments(output_dir="unused", save_strategy="epoch", report_to=[], use_cpu=True)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="every=<steps> or train with save_strategy='steps'"):
        callback.on_train_begin(args, TrainerState(max_steps=10), None, model=model)
    assert not model._forward_hooks and not model._forward_pre_hooks  # refused before any hook is placed


_DDP_WORKER = """
import sys, torch
from test_callback import EXAMPLES, _exact, _train
from helpers import tiny_model
from fastinfluence import ProjectionConfig

model = _exact(tiny_model("gpt2", torch.float64))
config = ProjectionConfig(rank_in=8, rank_out=8, dtype="float64")
out = __import__("pathlib").Path(sys.argv[1])
callback, snaps = _train(model, out, config, accumulation=1, steps=2, examples=EXAMPLES[:8], ddp_backend="gloo")
if torch.distributed.get_rank() == 0:
    torch.save(snaps.weights, out / "weights.pt")
"""


def test_torchrun_two_ranks_write_every_example_once_equal_to_extraction(tmp_path):
    """Under torchrun each rank trains its own examples; the interval stores hold both ranks' rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd + [str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stores = interval_stores(tmp_path / "features")
    assert [s.name for s in stores] == ["step-00000001", "step-00000002"]
    # 2 ranks x batch 2 per step, 8 examples: every example exactly once over the two steps
    ids = [i for p in stores for i in FeatureStore.open(p).ids]
    assert sorted(ids) == [100 + i for i in range(8)]
    weights = torch.load(tmp_path / "weights.pt")
    model = _exact(tiny_model("gpt2", torch.float64))
    config = ProjectionConfig(rank_in=8, rank_out=8, dtype="float64")
    by_id = {100 + i: ex for i, ex in enumerate(EXAMPLES)}
    for path in stores:
        store = FeatureStore.open(path)
        step = int(path.name.split("-")[1])
        assert store.meta["steps"] == [step] * 4
        model.load_state_dict(weights[step])
        ref = GradientExtractor(model, config).extract([collate([by_id[i]], ids=[i]) for i in store.ids])
        assert rel_err(store.to_features().data, ref.data) < 1e-10


# ----------------------------------------------------------------------------- kills and resumes


class _Killed(Exception):
    pass


class _KillAfterCheckpoint(TrainerCallback):
    """Stops the run right after the Trainer saved checkpoint-``step`` (before any later callback's
    ``on_save``): what a kill between the checkpoint and anything written after it leaves."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Killed


def _checkpointed_run(tmp_path, model, callbacks, resume=False, steps=4):
    args = _training_args(tmp_path, max_steps=steps, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    data = _Dataset(EXAMPLES)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume or None)


def _rows(path):
    """Each interval store's (name, ids, steps, rows) under ``path``."""
    out = []
    for p in interval_stores(path):
        store = FeatureStore.open(p)
        out.append((p.name, store.ids, store.meta["steps"], store.to_features().data))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    model = _exact(tiny_model("gpt2", torch.float64))
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    _checkpointed_run(tmp, model, [InfluenceCallback(tmp / "features", config)])
    return _rows(tmp / "features")


def _assert_same_rows(got, ref):
    assert [(n, i, s) for n, i, s, _ in got] == [(n, i, s) for n, i, s, _ in ref]
    for (_, _, _, a), (_, _, _, b) in zip(got, ref):
        assert rel_err(a, b) < 1e-10


def test_killed_right_after_a_checkpoint_the_resumed_run_has_every_interval_once(tmp_path, uninterrupted):
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    model = _exact(tiny_model("gpt2", torch.float64))
    with pytest.raises(_Killed):
        _checkpointed_run(tmp_path, model, [_KillAfterCheckpoint(2), InfluenceCallback(tmp_path / "features", config)])
    model = _exact(tiny_model("gpt2", torch.float64))
    _checkpointed_run(tmp_path, model, [InfluenceCallback(tmp_path / "features", config)], resume=True)
    _assert_same_rows(_rows(tmp_path / "features"), uninterrupted)


def test_killed_while_writing_an_interval_the_resumed_run_completes_it(tmp_path, uninterrupted, monkeypatch):
    from fastinfluence.store import writer

    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    real, calls = writer._write_shard, []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_shard", dies_on_the_second_shard)
    callback = InfluenceCallback(tmp_path / "features", config, shard_rows=1)
    with pytest.raises(_Killed):
        _checkpointed_run(tmp_path, _exact(tiny_model("gpt2", torch.float64)), [callback])
    monkeypatch.setattr(writer, "_write_shard", real)
    assert not (tmp_path / "out" / "checkpoint-2").exists()  # killed before the checkpoint: the interval replays
    _checkpointed_run(
        tmp_path, _exact(tiny_model("gpt2", torch.float64)), [InfluenceCallback(tmp_path / "features", config)]
    )
    _assert_same_rows(_rows(tmp_path / "features"), uninterrupted)


def test_a_resume_past_the_last_store_names_the_missing_steps(tmp_path, caplog):
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    _checkpointed_run(tmp_path, _exact(tiny_model("gpt2", torch.float64)), [InfluenceCallback(tmp_path / "f", config)])
    for p in interval_stores(tmp_path / "f"):  # as if the interval stores were lost
        import shutil

        shutil.rmtree(p)
    caplog.set_level("WARNING", logger="fastinfluence.callback")
    model = _exact(tiny_model("gpt2", torch.float64))
    _checkpointed_run(tmp_path, model, [InfluenceCallback(tmp_path / "f", config)], resume=True, steps=6)
    assert "training resumes at step 4 but the gradient stores" in caplog.text
    assert "the rows of steps 1..4 are missing; resume from checkpoint-0 (or earlier)" in caplog.text


def test_a_checkpoint_between_two_every_boundaries_ends_an_interval(tmp_path):
    """Rows are written before every checkpoint, also when ``every`` would end the interval later."""
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    callback = InfluenceCallback(tmp_path / "features", config, every=3)
    _checkpointed_run(tmp_path, _exact(tiny_model("gpt2", torch.float64)), [callback], steps=5)
    stores = [FeatureStore.open(p) for p in interval_stores(tmp_path / "features")]
    assert [s.meta["last_step"] for s in stores] == [2, 3, 4, 5]  # checkpoints at 2 and 4, every 3, the end
    assert sorted(i for s in stores for i in s.meta["steps"]) == sorted([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
