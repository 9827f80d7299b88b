"""Trainers on FSDP2-sharded models: the callback, ``UnlearnTrainer`` (and ``evaluate`` after it) and the
open-unlearning trainers, as ``accelerate launch`` with an FSDP2 config runs them (``test_sharded_trainers.py``).

``run(out, world)`` trains every case and returns what the test compares: per-step losses,
the callback's interval stores (written under ``out``), the unlearned weights and ``evaluate``
of the unlearned model. Under ``accelerate launch --use_fsdp --fsdp_version 2
--num_processes 2`` (``main``) each rank trains batches of 2 and accelerate shards the model
(``fully_shard`` on each decoder layer, then the root); one process (the test's reference)
trains the same global batch as 2 micro-batches of gradient accumulation. ``callback/user`` is
a model the user sharded with ``fully_shard`` before handing it to the Trainer (accelerate
keeps an ``FSDPModule`` as it is, under the ``NO_WRAP`` policy).

accelerate turns its FSDP plugin on for accelerator devices only (``DistributedType.MULTI_CPU``
ranks get DDP). On these CPU ranks :func:`fsdp_on_cpu` makes that one choice as on GPUs, so
the rest is accelerate's own FSDP2 path: ``fsdp2_prepare_model`` (its auto-wrap policy, the
full state dict loaded into the shards), the optimizer over the sharded parameters, the
gradient reduction by FSDP2.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from helpers import VOCAB, make_examples, tiny_model  # noqa: E402

STEPS = 3
BATCH = 2  # per rank and step: the global batch is 2 x 2 (one process: 2 micro-batches of 2)


def fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin run on CPU ranks (gloo): it otherwise keeps FSDP for accelerator devices."""
    from accelerate import state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if getattr(init, "fsdp_on_cpu", False):
        return

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    patched.fsdp_on_cpu = True
    state.AcceleratorState.__init__ = patched


def _args(out: Path, world: int, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=2 // world,
        max_steps=STEPS,
        train_sampling_strategy="sequential",  # the same examples in each global batch, whatever the world
        lr_scheduler_type="constant",
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **kw})


def _result(trainer) -> dict:
    """A finished Trainer's per-step losses, whether its model was sharded, and its weights (gathered whole)."""
    from fastinfluence.sharding import is_sharded, whole

    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "sharded": is_sharded(trainer.model),
        "state": {n: whole(p.detach()).clone() for n, p in trainer.model.named_parameters()},
    }


def model():
    return tiny_model("llama", torch.float64)


def shard_by_hand(m: torch.nn.Module, world: int) -> torch.nn.Module:
    """``fully_shard`` applied by the user before the Trainer sees the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


def callback_run(out: Path, world: int, by_hand: bool) -> dict:
    """InfluenceCallback on the Trainer's own steps: one interval store per step and kind under ``out/features``
    (projected gradients, and Adam update directions from the optimizer's sharded moments)."""
    from sharded_cases import CONFIGS
    from test_callback import EXAMPLES, _collate, _Dataset, _float64_loss
    from transformers import Trainer

    from fastinfluence import InfluenceCallback

    m = _float64_loss(model())  # the model's own loss, in float64
    if by_hand:
        m = shard_by_hand(m, world)
    callback = InfluenceCallback(out / "features", CONFIGS["all"], every=1, features=("gradient", "adam"))
    trainer = Trainer(
        model=m, args=_args(out, world), train_dataset=_Dataset(EXAMPLES), data_collator=_collate, callbacks=[callback]
    )
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "auto_wrap_policy", None)
    if by_hand:  # the launch's policy wraps by class name, which fully_shard changed: NO_WRAP, as its user runs it
        plugin.auto_wrap_policy = None
    try:
        trainer.train()
    finally:
        if plugin is not None:
            plugin.auto_wrap_policy = policy
    return _result(trainer)


def unlearn_data():
    examples = make_examples(12, seed=5)
    as_dict = [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in examples]
    return as_dict[:8], as_dict[8:]


def unlearn_run(out: Path, world: int) -> dict:
    """UnlearnTrainer (weighted GradDiff) on the sharded model, then ``evaluate`` (every rank the same batches)."""
    from helpers import collate

    from fastinfluence.evaluate import evaluate
    from fastinfluence.unlearn import UnlearnDataset, UnlearnTrainer

    forget, retain = unlearn_data()
    weights = torch.linspace(0.5, 2.0, len(forget))
    data = UnlearnDataset(forget, retain, ratio=1, forget_weights=weights)
    trainer = UnlearnTrainer(model=model(), args=_args(out, world), method="graddiff", train_dataset=data)
    trainer.train()
    m = trainer.model
    examples = make_examples(6, seed=9)
    batches = [collate(examples[s : s + 3]) for s in (0, 3)]
    result = evaluate(m, clean=batches, forget=batches[:1], holdout=batches[1:])
    return _result(trainer) | {"eval": {k: v for k, v in result.items() if k != "eval_wall_s"}}


class PairedDataset(torch.utils.data.Dataset):
    """open-unlearning's ForgetRetainDataset with retain example ``idx % len(retain)`` instead of a random one
    (its pick uses the global RNG, which each rank draws from in another order)."""

    def __init__(self, forget, retain):
        self.forget, self.retain = forget, retain

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, idx):
        return {"forget": self.forget[idx], "retain": self.retain[idx % len(self.retain)]}


def open_unlearning_run(out: Path, world: int, handler: str) -> dict:
    import open_unlearning_rendition as ou

    from fastinfluence.integrations import open_unlearning as oul

    alternate = handler == "FIRapidUn"
    forget, retain = ou.qa_items(8, seed=1, vocab=VOCAB, alternate=alternate), ou.qa_items(5, seed=2, vocab=VOCAB)
    cls = oul.trainers(ou.UnlearnTrainer)[handler]
    trainer = cls(
        model=model(),
        train_dataset=PairedDataset(forget, retain),
        eval_dataset=None,
        data_collator=ou.collator(),
        args=_args(out, world),
        evaluators=None,
        template_args=None,
        gamma=1.0,
        alpha=0.5,
    )
    trainer.train()
    return _result(trainer)


HANDLERS = ("FIGradDiff", "FINPO", "FIRapidUn")


def run(out: Path, world: int) -> dict:
    got: dict = {}
    for by_hand in (False, True) if world > 1 else (False,):
        name = "callback/user" if by_hand else "callback/accelerate"
        got[name] = callback_run(out / name, world, by_hand)
    got["unlearn"] = unlearn_run(out / "unlearn", world)
    for handler in HANDLERS:
        got[handler] = open_unlearning_run(out / handler, world, handler)
    return got


def main(out: Path) -> None:
    import torch.distributed as tdist
    from accelerate import PartialState

    fsdp_on_cpu()
    state = PartialState(cpu=True)  # as TrainingArguments(use_cpu=True) makes it
    assert state.num_processes > 1, "run under accelerate launch --num_processes 2 (or more)"
    got = run(out, state.num_processes) | {"world": tdist.get_world_size()}
    if state.is_main_process:
        torch.save(got, out / "sharded.pt")
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)  # a lost peer ends the run with the stacks, not a hang
    torch.set_num_threads(1)
    assert os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true", "run under accelerate launch --use_fsdp"
    main(Path(sys.argv[1]))
