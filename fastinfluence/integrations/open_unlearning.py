"""open-unlearning trainers that compute fastinfluence's losses, with per-example influence weights.

open-unlearning (github.com/locuslab/open-unlearning) keeps one ``Trainer`` subclass per
method, registered by class name in its ``src/trainer/__init__.py`` and chosen by ``handler:``
in ``configs/trainer/<Name>.yaml``. Its batches are ``{"forget": batch, "retain": batch}``
(``ForgetRetainDataset`` + ``DataCollatorForSupervisedDataset``: right padding, pad = eos,
``attention_mask = input_ids != pad``; ``index`` in each batch with the collator
``DataCollatorForSupervisedDatasetwithIndex``). The classes here subclass its own base class,
``trainer.unlearn.base.UnlearnTrainer``, so its data pipeline, evaluators and configs work
unchanged; they take its method arguments (``gamma`` forget coefficient, ``alpha`` retain
coefficient, ``beta``, ``delta``, ``retain_loss_type`` NLL | KL) and add ``reduction``,
``weight_norm``, ``weights_path`` and ``router_aux_loss``:

    handler         forget term (times gamma)                         retain term (times alpha)
    FIGradAscent    -R_w[NLL_f]                                       none
    FIGradDiff      -R_w[NLL_f]                                       R_w[NLL_r] or KL
    FINPO           NPO, reference NLL cached once before training    R_w[NLL_r] or KL
    FISimNPO        SimNPO, margin delta (open-unlearning's units)    R_w[NLL_r] or KL
    FIRapidUn       0.5 R_w[NLL(clean)] - R_w[NLL(poisoned)]          R_w[NLL_r] or KL
    FIIMU           IMU: -sum_i w_i NLL_i / sum_i w_i                 none
    FIIMUGradDiff   the same, plus a retain term                      R_w[NLL_r] or KL

R_w is ``fastinfluence.losses.reduce``: ``reduction="token"`` (the default here) is the token
mean over the batch that open-unlearning's ``outputs.loss`` computes, so with weights of 1 the
losses equal open-unlearning's own; ``"example"`` averages per-example means. KL is
KL(reference || model) over every position of the retain batch, open-unlearning's
``batchmean``; the reference is a frozen copy of the model (the base model, adapter disabled,
for a PEFT model). NLLs come from ``ops.linear_cross_entropy`` without B x T x V logits.

Weights (``weights_path``): the file ``fastinfluence weights`` writes, read by
``fastinfluence.weights.load_weights`` as the CLI reads it (``forget``, ``retain`` and/or
low-influence ``keep`` lists, or a ``.pt`` / ``.npy`` vector of forget weights), in the order
of the forget (retain) split; each batch's weights are looked up by its ``index``. Forget
examples left out of ``keep`` are dropped from the forget split, as in the CLI.
RapidUn's clean answers come from a forget dataset that yields
``{"original": ..., "alternate": ...}`` (open-unlearning's ``QAwithAlternateDataset``);
``FIRapidUn`` refuses a forget set without them unless ``rapidun_without_clean: true``
(weighted gradient ascent on the forget answers).

MoE models (``router_aux_loss``, an ``UnlearnOptions`` field, as in ``UnlearnTrainer``): the
losses read the answer NLL only, so the router load-balancing loss that
``output_router_logits=True`` adds to the model's own ``outputs.loss`` is left out (false, the
default); true adds the model's ``router_aux_loss_coef`` times it for each forward of the step
with a gradient (forget, retain, clean answers; not the reference's), a number sets the
coefficient (``losses.RouterAux``, transformers 5.x MoE models).

Nothing here imports open-unlearning until a trainer class is asked for. Set up a checkout
(copies the yaml files of ``open_unlearning_configs/`` and adds two lines registering the
classes to ``src/trainer/__init__.py``; safe to run twice)::

    python -m fastinfluence.integrations.open_unlearning install /path/to/open-unlearning

or register by hand at the end of that file::

    from fastinfluence.integrations.open_unlearning import register
    register(_register_trainer)

See docs/unlearning.md for the whole recipe.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch

from .. import losses
from ..options import UnlearnOptions
from ..unlearn import forget_loss, frozen, retain_loss
from ..weights import load_weights

CONFIGS = Path(__file__).parent / "open_unlearning_configs"
_MARK = "# fastinfluence trainers"
REGISTRATION = (
    f"from fastinfluence.integrations.open_unlearning import register as _register_fastinfluence  {_MARK}\n"
    f"_register_fastinfluence(_register_trainer)  {_MARK}\n"
)
USAGE = (
    "open-unlearning is not importable here: these trainers subclass its trainer.unlearn.base.UnlearnTrainer, "
    "so they run inside an open-unlearning checkout (its src/ on sys.path, as under `python src/train.py`). "
    "Set one up with `python -m fastinfluence.integrations.open_unlearning install /path/to/open-unlearning` "
    "(see docs/unlearning.md), or pass base= to trainers()."
)

# handler name -> (method, uses a retain term, default reduction, default weight_norm, needs weights)
SPECS = {
    "FIGradAscent": ("ga", False, "token", "mean", False),
    "FIGradDiff": ("graddiff", True, "token", "mean", False),
    "FINPO": ("npo", True, "token", "mean", False),
    "FISimNPO": ("simnpo", True, "token", "mean", False),
    "FIRapidUn": ("rapidun", True, "token", "mean", False),
    "FIIMU": ("ga", False, "example", "sum", True),
    "FIIMUGradDiff": ("graddiff", True, "example", "sum", True),
}


class _Kept(torch.utils.data.Dataset):
    """The kept examples of a split (low-influence skipping drops the others); each item keeps its
    own ``index``, so weights are still looked up by the example's place in the whole split."""

    def __init__(self, split, keep: list[int]):
        self.split, self.keep = split, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i):
        return self.split[self.keep[i]]


class _InfluenceLossTrainer:
    """The loss of every open-unlearning trainer here; mixed in before open-unlearning's base class."""

    spec: tuple  # one entry of SPECS

    def __init__(
        self,
        *args,
        gamma: float = 1.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        delta: float = 0.0,
        retain_loss_type: str = "NLL",
        reduction: str | None = None,
        weight_norm: str | None = None,
        weights_path: str | None = None,
        rapidun_without_clean: bool = False,
        router_aux_loss: bool | float = False,
        **kwargs,
    ):
        method, self.uses_retain, default_reduction, default_norm, needs_weights = self.spec
        # SimNPO's margin is delta here, as in open-unlearning (simnpo_gamma stays 0)
        options = UnlearnOptions(
            method=method,
            alpha=alpha,
            gamma=gamma,
            beta=beta,
            delta=delta,
            reduction=reduction or default_reduction,
            weight_norm=weight_norm or default_norm,
            retain_loss_type=retain_loss_type,
            rapidun_without_clean=rapidun_without_clean,
            router_aux_loss=router_aux_loss,
        )
        if needs_weights and not weights_path:
            raise ValueError(
                f"{type(self).__name__} needs weights_path= (IMU weights from `fastinfluence weights --method imu`)"
            )
        super().__init__(*args, **kwargs)
        self.options = options
        self.method, self.gamma, self.alpha, self.beta, self.delta = method, gamma, alpha, beta, delta
        self.simnpo_gamma, self.rapidun_without_clean = options.simnpo_gamma, rapidun_without_clean
        self.reduction, self.weight_norm, self.retain_loss_type = (
            options.reduction,
            options.weight_norm,
            retain_loss_type,
        )
        self.weights_path = weights_path
        forget = self._split("forget")
        if method == "rapidun" and forget is not None and len(forget):
            self._check_clean(forget[0])
        self.forget_weights = self.retain_weights = None
        if weights_path:
            self._use_weights(load_weights(weights_path))
        # The loss is a mean per micro-batch: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.ref_model = self._reference_model() if self.uses_retain and retain_loss_type == "KL" else None
        self.ref_nll = self._reference_nll() if method == "npo" else None
        # after the reference copy (its forwards have no gradient, so they would not count anyway)
        aux = options.router_aux_loss
        self.router_aux = losses.RouterAux(self.model, aux) if aux is not False else None

    def _check_clean(self, forget: dict) -> None:
        """RapidUn without clean answers is gradient ascent: refused unless asked for by name."""
        if not self.rapidun_without_clean and not (isinstance(forget, dict) and "alternate" in forget):
            raise ValueError(
                f"{type(self).__name__} trains towards each forget example's clean answer, but the forget data "
                "yields no 'alternate': use a forget dataset of {'original', 'alternate'} pairs (open-unlearning's "
                "QAwithAlternateDataset, the clean answer as alternate_key), or set "
                "trainer.method_args.rapidun_without_clean=true for weighted gradient ascent"
            )

    def _split(self, name: str):
        return getattr(self.train_dataset, name, None)

    def _use_weights(self, w) -> None:
        """Weights by the example's index in its split; skipped (low-influence) forget examples are
        dropped from the forget split, as the CLI and ``UnlearnDataset`` do (see fastinfluence.weights)."""
        forget, retain = self._split("forget"), self._split("retain")
        n_forget = len(forget) if forget is not None else w.n_forget
        if n_forget is None:  # no split to check against: the weights' own length
            kept = w.keep if w.keep is not None and len(w.keep) else None
            n_forget = len(w.forget) if w.forget is not None else (int(kept.max()) + 1 if kept is not None else 0)
        keep = w.check(n_forget, len(retain) if retain is not None else None, f"weights_path {self.weights_path}")
        self.forget_weights, self.retain_weights = w.forget, w.retain
        if forget is not None and len(keep) < len(forget):
            kept = copy.copy(self.train_dataset)
            kept.forget = _Kept(forget, keep)
            self.train_dataset = kept

    def _reference_model(self):
        """Frozen copy of the model for the KL retain loss (None: a PEFT model's adapter is disabled instead)."""
        if hasattr(self.model, "disable_adapter"):
            return None
        ref = copy.deepcopy(self.model)
        if getattr(self, "is_deepspeed_enabled", False):
            return self._prepare_deepspeed(ref)  # open-unlearning's base class shards it like the model
        return self.accelerator.prepare_model(frozen(ref, self.args.device), evaluation_mode=True)

    def _reference_nll(self) -> torch.Tensor:
        """NLL_sum of every forget example before unlearning (NPO's pi_ref), by dataset index.

        Collated with the training collator and computed under the training autocast, so that
        pi / pi_ref = 1 at the first step.
        """
        forget = self._split("forget")
        if forget is None:
            raise ValueError(
                "FINPO needs open-unlearning's ForgetRetainDataset as train_dataset (run with mode=unlearn)"
            )
        rows, sums, index = self.args.per_device_eval_batch_size, [], []
        for s in range(0, len(forget), rows):
            batch = self._flat(self.data_collator([forget[i] for i in range(s, min(s + rows, len(forget)))]))
            index.append(self._index(batch, "NPO's reference cache").cpu())
            batch = {k: v.to(self.args.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with self.autocast_smart_context_manager():
                sums.append(losses.reference_nll(self.model, [batch]))
        index, sums = torch.cat(index), torch.cat(sums)
        ref = torch.full((int(index.max()) + 1,), float("nan"), dtype=sums.dtype)
        ref[index] = sums
        return ref

    @staticmethod
    def _flat(batch: dict) -> dict:
        """The answer batch of a forget batch: ``original`` of an original/alternate pair."""
        return batch["original"] if "original" in batch else batch

    @staticmethod
    def _index(batch: dict, what: str) -> torch.Tensor:
        if "index" not in batch:
            raise ValueError(
                f"{what} needs each batch's 'index': run open-unlearning with "
                "collator=DataCollatorForSupervisedDatasetwithIndex"
            )
        return batch["index"].long()

    def _lookup(self, weights: torch.Tensor | None, batch: dict, name: str) -> torch.Tensor | None:
        if weights is None:
            return None
        index = self._index(batch, f"weights_path ({name} weights)").cpu()
        if index.min() < 0 or index.max() >= len(weights):
            raise ValueError(
                f"{self.weights_path} has {len(weights)} {name} weights but a batch holds index "
                f"{int(index.max())}; compute the weights on the same split"
            )
        return weights[index].to(batch["input_ids"].device)

    def compute_unlearn_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss of an unlearning batch ``{"forget": ..., "retain": ...}``."""
        forget = inputs["forget"]
        poisoned = self._flat(forget)
        if self.router_aux is not None:
            self.router_aux.arm()
        f = losses.sequence_nll(model, poisoned)
        ref = None
        if self.method == "npo":
            index = self._index(poisoned, "NPO").cpu()
            ref = self.ref_nll[index.clamp(max=len(self.ref_nll) - 1)]
            if index.max() >= len(self.ref_nll) or torch.isnan(ref).any():
                raise ValueError("a forget batch holds an index that NPO's reference cache never saw")
        clean = None
        if self.method == "rapidun":
            self._check_clean(forget)
            clean = losses.sequence_nll(model, forget["alternate"]) if "alternate" in forget else None
        loss = self.gamma * forget_loss(self, f, self._lookup(self.forget_weights, poisoned, "forget"), ref, clean)
        if self.uses_retain:
            retain = inputs["retain"]
            wr = self._lookup(self.retain_weights, retain, "retain")
            loss = loss + self.alpha * retain_loss(self, model, retain, wr)
        if self.router_aux is not None:  # coef * the load-balancing loss of each forward with gradient
            loss = loss + self.router_aux.take().to(loss.device)
        return (loss, None) if return_outputs else loss


class _LossDispatch:
    """open-unlearning's train/eval dispatch, for its base classes that predate it (newer ones, since
    its PR #175, do the same in their own ``compute_loss``): an unlearning batch gets the method's
    loss, any other batch (an HF ``eval_dataset``) the model's own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "forget" in inputs:
            return self.compute_unlearn_loss(model, inputs, return_outputs)
        # open-unlearning's datasets add an "index"; models of transformers before 5 take no such argument
        inputs = {k: v for k, v in inputs.items() if k != "index"}
        # transformers before 4.46 takes no num_items_in_batch
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **extra)


_BUILT: dict[type, dict[str, type]] = {}


def trainers(base: type | None = None) -> dict[str, type]:
    """{handler name: trainer class} built on ``base`` (default: open-unlearning's UnlearnTrainer), once per base."""
    if base is None:
        try:
            from trainer.unlearn.base import UnlearnTrainer as base
        except ImportError as e:
            raise ImportError(USAGE) from e
    if base not in _BUILT:
        dispatch = () if hasattr(base, "compute_unlearn_loss") else (_LossDispatch,)
        _BUILT[base] = {
            name: type(
                name,
                (*dispatch, _InfluenceLossTrainer, base),
                {
                    "spec": spec,
                    "__module__": __name__,
                    "__doc__": f"open-unlearning trainer with fastinfluence's {spec[0]} loss (see the module).",
                },
            )
            for name, spec in SPECS.items()
        }
    return _BUILT[base]


def register(register_trainer, base: type | None = None) -> dict[str, type]:
    """Register every class with open-unlearning's ``_register_trainer`` (by class name = ``handler``)."""
    classes = trainers(base)
    for cls in classes.values():
        register_trainer(cls)
    return classes


def install(root: str | Path) -> list[Path]:
    """Copy the yaml files into ``root/configs`` and register the trainers in ``root/src/trainer/__init__.py``."""
    root = Path(root)
    init = root / "src" / "trainer" / "__init__.py"
    if not init.is_file() or "_register_trainer" not in init.read_text():
        raise FileNotFoundError(f"{root} is not an open-unlearning checkout: {init} with _register_trainer not found")
    written = []
    for src in sorted(CONFIGS.rglob("*.yaml")):
        dest = root / "configs" / src.relative_to(CONFIGS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(dest)
    text = init.read_text()
    if _MARK not in text:
        init.write_text(text + ("" if text.endswith("\n") else "\n") + "\n" + REGISTRATION)
        written.append(init)
    return written


def __getattr__(name: str):
    if name in SPECS:
        return trainers()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastinfluence.integrations.open_unlearning",
        description="Use fastinfluence's influence-weighted trainers in open-unlearning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="copy the trainer and experiment yaml files and register the trainers")
    p.add_argument("root", help="an open-unlearning checkout")
    args = parser.parse_args(argv)
    for path in install(args.root):
        print(f"wrote {path}")
    print(
        "run: python src/train.py --config-name=unlearn.yaml experiment=unlearn/tofu/fastinfluence_weighted "
        "trainer.method_args.weights_path=/abs/path/w.json task_name=fi_weighted"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
