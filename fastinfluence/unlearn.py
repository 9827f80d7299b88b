"""Influence-guided unlearning with the Hugging Face ``Trainer``.

``UnlearnTrainer`` takes batches shaped ``{"forget": batch, "retain": batch}`` (the
open-unlearning convention), built by :class:`UnlearnDataset` + :class:`UnlearnCollator`
from forget and retain examples at a retain:forget ratio (3:1 by default), each carrying
its per-example weight. The loss is one of ``fastinfluence.losses``:

    ga        -gamma R_w[NLL_f]                          (IMU: ga with ``weights.imu`` weights)
    graddiff  -gamma R_w[NLL_f] + alpha R_w[retain]      (SIMU: graddiff with ``simu_masks``)
    npo       gamma NPO(f; pi_ref cached once) + alpha R_w[retain]
    simnpo    gamma SimNPO(f) + alpha R_w[retain]
    rapidun   gamma (0.5 R_w[NLL(clean)] - 1.0 R_w[NLL(poisoned)]) + alpha R_w[retain]
              (rapidun_tokens="differing": NLLs over the answer tokens where clean and poisoned differ)

R_w is the weighted ``reduction`` of ``fastinfluence.losses`` (``"example"``: mean of
per-example means; ``"token"``: token mean over the batch, as open-unlearning), and the
retain term is the NLL or, with ``retain_loss_type="KL"``, KL(reference || model). Every NLL
comes from ``ops.linear_cross_entropy`` on the final hidden states, so the B x T x V logits
are never held (the KL needs them).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback

from . import losses, moe
from .data import pad
from .errors import FastInfluenceError
from .lm import IGNORE_INDEX, mlp_blocks
from .options import METHODS as METHODS
from .options import UnlearnOptions
from .weights import loss_reweight


def _check_weights(name: str, w, n: int) -> torch.Tensor:
    if w is None:
        return torch.ones(n)
    w = torch.as_tensor(w, dtype=torch.float32).flatten()
    if w.shape[0] != n:
        raise ValueError(f"{name} has {w.shape[0]} entries but there are {n} examples; give one weight per example")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(
            f"{name} must be finite and non-negative (the method supplies the sign of each term); "
            f"found {w[~torch.isfinite(w) | (w < 0)][:3].tolist()}"
        )
    return w


def _as_example(e) -> dict:
    out = {"input_ids": list(map(int, e["input_ids"])), "labels": list(map(int, e["labels"]))}
    if len(out["input_ids"]) != len(out["labels"]):
        raise ValueError(f"an example has {len(out['input_ids'])} input_ids but {len(out['labels'])} labels")
    if all(label == IGNORE_INDEX for label in out["labels"][1:]):
        raise ValueError("an example has no answer tokens (labels all -100 after the first); label its answer")
    return out


class UnlearnDataset(torch.utils.data.Dataset):
    """Forget examples, each paired with ``ratio`` retain examples.

    Args:
        forget: examples ``{"input_ids": [...], "labels": [...]}`` (labels -100 off the
            answer), optionally with ``"clean"``: the same prompt with its clean answer.
        retain: examples of the same form (may be empty for ``ga``).
        ratio: retain examples per forget example (RapidUn: 3).
        forget_weights, retain_weights: (Nf,) / (Nr,) non-negative weights (default 1).
        seed: shuffles the retain set; it is then cycled through in that order, ``ratio``
            examples per forget example and epoch, so every retain example is used once every
            ceil(Nr / (Nf * ratio)) epochs.

    Item i of epoch e: ``{"forget": forget[i] + weight + index, "retain": [ratio retain
    examples]}``, the retain block at position (e * Nf + i) * ratio of the shuffled order.
    Items are a function of (i, epoch) only, so DataLoader workers (each holding a copy of
    the dataset) agree; ``set_epoch(e)`` (called by ``UnlearnTrainer`` at every epoch,
    before the workers start) moves to epoch e.
    """

    def __init__(
        self,
        forget: Sequence[dict],
        retain: Sequence[dict] = (),
        ratio: int = 3,
        forget_weights=None,
        retain_weights=None,
        seed: int = 0,
    ):
        if len(forget) == 0:
            raise ValueError("the forget set is empty; unlearning needs at least one forget example")
        if ratio < 0 or (ratio > 0 and len(retain) == 0):
            raise ValueError(
                f"ratio={ratio} retain examples per forget example needs a non-empty retain set (or ratio=0)"
            )
        self.forget = [_as_example(e) | ({"clean": _as_example(e["clean"])} if "clean" in e else {}) for e in forget]
        self.retain = [_as_example(e) for e in retain]
        self.forget_weights = _check_weights("forget_weights", forget_weights, len(forget))
        self.retain_weights = _check_weights("retain_weights", retain_weights, len(retain))
        self.ratio = ratio
        self.order = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed)).tolist()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        f = self.forget[i] | {"weight": float(self.forget_weights[i]), "index": i}
        # Epoch e takes the next Nf * ratio examples of the shuffled retain order, so successive
        # epochs walk through the whole retain set rather than its first Nf * ratio examples.
        start = (self.epoch * len(self.forget) + i) * self.ratio
        picks = [self.order[(start + j) % len(self.retain)] for j in range(self.ratio)]
        return {"forget": f, "retain": [self.retain[j] | {"weight": float(self.retain_weights[j])} for j in picks]}


class UnlearnCollator:
    """Pads an ``UnlearnDataset`` item list into ``{"forget": batch, "retain": batch}``.

    forget: input_ids, attention_mask, labels (B, T); weights (B,) float32; index (B,)
    int64; ``clean`` (a padded batch) when the examples carry clean answers. retain: the
    same for the B * ratio retain examples (absent when ratio is 0).
    """

    def __init__(self, pad_token_id: int = 0, side: str = "right"):
        if side not in ("right", "left"):
            raise ValueError(f"side must be 'right' or 'left', got {side!r}")
        self.pad_token_id, self.side = pad_token_id, side

    def pad(self, examples: list[dict]) -> dict:
        return pad(
            [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], self.pad_token_id, self.side
        )

    def __call__(self, items: list[dict]) -> dict:
        forget = [it["forget"] for it in items]
        out = {"forget": self.pad(forget)}
        out["forget"]["weights"] = torch.tensor([e["weight"] for e in forget])
        out["forget"]["index"] = torch.tensor([e["index"] for e in forget])
        if all("clean" in e for e in forget):
            out["forget"]["clean"] = self.pad([e["clean"] for e in forget])
        retain = [r for it in items for r in it["retain"]]
        if retain:
            out["retain"] = self.pad(retain)
            out["retain"]["weights"] = torch.tensor([r["weight"] for r in retain])
        return out


def apply_neuron_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Restrict training to the masked MLP neurons (SIMU): freeze every other parameter.

    For block b and neuron j with ``masks[b][j]`` True, the neuron's row of each
    up-projection (and its bias entry) and its column of the down-projection are trainable;
    the gradient of every other entry is zeroed by a hook, and parameters outside the masked
    blocks get ``requires_grad=False``. An expert of an MoE block (``<experts module>.<e>``)
    is a block whose neurons are its intermediate units: their units of the fused up
    projection (gate and up), bias entries included, and columns of the fused down projection,
    in expert e's slice only. Returns the hook handles.
    """
    experts = {f"{n}.{e}" for n, m in moe.experts_modules(model).items() for e in range(m.down_proj.shape[0])}
    blocks = mlp_blocks(model, required=not experts)
    unknown = sorted(set(masks) - set(blocks) - experts)
    if unknown:
        raise ValueError(
            f"simu_masks name blocks {unknown} that are not MLP blocks or experts of this model "
            f"({sorted(blocks | dict.fromkeys(experts))[:3]}...)"
        )
    # Experts (``<experts module>.<e>``): their slices of the fused parameters (moe.expert_neuron_keep).
    trainable: dict[int, torch.Tensor] = moe.expert_neuron_keep(model, masks)
    for name, mask in masks.items():
        if name in experts:
            continue
        ups, down = blocks[name]
        mask = torch.as_tensor(mask, dtype=torch.bool)
        for module, is_up in [(u, True) for u in ups] + [(down, False)]:
            # nn.Linear weight is (out, in); GPT-2 Conv1D weight is (in, out).
            conv = type(module).__name__ == "Conv1D"
            neuron_dim = (0 if is_up else 1) ^ int(conv)
            w = module.weight
            if w.shape[neuron_dim] != mask.numel():
                raise ValueError(
                    f"simu_masks[{name!r}] has {mask.numel()} neurons, the block has {w.shape[neuron_dim]}"
                )
            shape = [1, 1]
            shape[neuron_dim] = -1
            trainable[id(w)] = mask.view(shape)
            if is_up and module.bias is not None:
                trainable[id(module.bias)] = mask
    handles = []
    for p in model.parameters():
        keep = trainable.get(id(p))
        if keep is None:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        handles.append(p.register_hook(lambda g, keep=keep: g * keep.to(device=g.device, dtype=g.dtype)))
    return handles


def check_clean_answers(missing: list[int], without_clean: bool) -> None:
    """Refuse RapidUn forget examples without a clean answer (``missing``: their positions) unless
    ``without_clean``: without one, the forget term would quietly become gradient ascent."""
    if missing and not without_clean:
        raise ValueError(
            f"method='rapidun' trains towards each forget example's clean answer, but forget examples "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} have none: give each a 'clean' example (the same "
            "prompt with its clean answer), or pass rapidun_without_clean=True for weighted gradient ascent on the "
            "poisoned answers"
        )


def frozen(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` as a reference: eval mode, no gradients, on ``device``."""
    return model.to(device).eval().requires_grad_(False)


def forget_loss(cfg, f: losses.Nll, w, ref_sum=None, clean=None) -> torch.Tensor:
    """The forget term of ``cfg.method`` (before the coefficient gamma), with the options of ``cfg``:
    ``reduction``, ``weight_norm``, ``beta``, ``simnpo_gamma``, ``delta``, ``rapidun_tokens``.
    Shared by ``UnlearnTrainer`` and the open-unlearning trainers so both compute the same losses.
    RapidUn's forget loss always divides by the batch (``weight_norm`` does not apply to it)."""
    if cfg.method == "npo":
        return losses.npo(f, ref_sum, w, beta=cfg.beta, weight_norm=cfg.weight_norm)
    if cfg.method == "simnpo":
        return losses.simnpo(f, w, beta=cfg.beta, gamma=cfg.simnpo_gamma, delta=cfg.delta, weight_norm=cfg.weight_norm)
    if cfg.method == "rapidun":
        return losses.rapidun_forget(f, clean, w, reduction=cfg.reduction, tokens=getattr(cfg, "rapidun_tokens", "all"))
    return losses.ga(f, w, reduction=cfg.reduction, weight_norm=cfg.weight_norm)


def retain_loss(cfg, model, retain: dict, w) -> torch.Tensor:
    """R_w of the retain NLL or, with ``cfg.retain_loss_type == "KL"``, of KL(cfg.ref_model || model)."""
    if cfg.retain_loss_type == "KL":
        return losses.retain_nll(losses.sequence_kl(model, retain, cfg.ref_model), w, cfg.reduction, cfg.weight_norm)
    return losses.retain_nll(losses.sequence_nll(model, retain), w, cfg.reduction, cfg.weight_norm)


class _EpochCallback(TrainerCallback):
    """Tells the UnlearnDataset which epoch starts (before the epoch's DataLoader workers fork)."""

    def __init__(self, dataset: UnlearnDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor(state.epoch + 1e-6)) if state.epoch else 0)


class UnlearnTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is an unlearning method (see module docstring).

    Args:
        options: an ``UnlearnOptions``, the method and its loss (method, alpha, gamma, beta,
            simnpo_gamma, delta, reduction, weight_norm, retain_loss_type, loss_reweight_tau,
            rapidun_tokens, rapidun_without_clean: its docstring describes them), or its fields
            as keyword arguments; not both. The reference of the KL retain loss is
            ``ref_model``, else the base model with the adapter disabled under ``lora=``, else a
            frozen copy of ``model``. ``rapidun_tokens="differing"`` needs forget examples with
            ``clean`` answers; RapidUn refuses forget examples without one unless
            ``rapidun_without_clean``.
        lora: a ``peft.LoraConfig``: train adapters only (``save_model`` writes the adapter).
        simu_masks: ``weights.simu_mask`` output: only those MLP neurons are trained.
        ref_model: the reference model of the KL retain loss.
        Options of MoE models: ``router_aux_loss`` (an ``UnlearnOptions`` field): the losses
            leave the router auxiliary (load-balancing) loss out (False, the default); True adds
            ``router_aux_loss_coef`` times it for each forward of the step with gradient
            (forget, retain, clean); a number is the coefficient (``losses.RouterAux``).
        Everything else is passed to ``Trainer`` (``train_dataset`` an ``UnlearnDataset``,
        ``data_collator`` defaults to ``UnlearnCollator``). ``remove_unused_columns`` is
        turned off, because the batches are nested.

    Logged: ``forget_loss`` and ``retain_loss`` (the method's terms), ``forget_nll`` (mean
    forget CE), ``tokens`` processed and, with ``router_aux_loss``, ``router_aux_loss``.
    """

    def __init__(
        self,
        model=None,
        args=None,
        options: UnlearnOptions | None = None,
        lora=None,
        simu_masks: dict | None = None,
        ref_model=None,
        **kwargs,
    ):
        fields = {f.name for f in dataclasses.fields(UnlearnOptions)}
        o = UnlearnOptions.resolve(options, {k: kwargs.pop(k) for k in list(kwargs) if k in fields}, "UnlearnTrainer")
        dataset = kwargs.get("train_dataset")
        if not isinstance(dataset, UnlearnDataset):
            raise TypeError("UnlearnTrainer needs train_dataset=UnlearnDataset(forget, retain, ...)")
        if o.rapidun_tokens == "differing" and not all("clean" in e for e in dataset.forget):
            raise FastInfluenceError(
                "rapidun_tokens='differing' compares each forget example with its clean answer: "
                "give every forget example a 'clean' example",
                "rapidun_tokens",
            )
        if o.method == "rapidun":
            check_clean_answers([i for i, e in enumerate(dataset.forget) if "clean" not in e], o.rapidun_without_clean)
        if o.uses_retain and dataset.ratio == 0:
            raise FastInfluenceError(
                f"method {o.method!r} has a retain term; build the UnlearnDataset with ratio >= 1", "method"
            )
        if lora is not None and simu_masks is not None:
            raise FastInfluenceError(
                "use either lora= or simu_masks=, not both (masks select base-model neurons)", "lora"
            )
        needs_copy = ref_model is None and lora is None and not hasattr(model, "disable_adapter")
        if o.uses_retain and o.retain_loss_type == "KL" and needs_copy:
            ref_model = copy.deepcopy(model)  # before masks or adapters are attached
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
        self._mask_handles = apply_neuron_masks(model, simu_masks) if simu_masks is not None else []
        self._router_aux = losses.RouterAux(model, o.router_aux_loss) if o.router_aux_loss is not False else None
        kwargs.setdefault("data_collator", UnlearnCollator(getattr(model.config, "pad_token_id", None) or 0))
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(_EpochCallback(dataset))
        self.args.remove_unused_columns = False  # the batches are nested {"forget", "retain"} dicts
        # Our loss is a mean per micro-batch: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.options = o
        self.method, self.alpha, self.gamma, self.simnpo_gamma, self.delta = (
            o.method,
            o.alpha,
            o.gamma,
            o.simnpo_gamma,
            o.delta,
        )
        self.reduction, self.weight_norm, self.retain_loss_type = o.reduction, o.weight_norm, o.retain_loss_type
        self.ref_model = frozen(ref_model, self.args.device) if ref_model is not None else None
        self.beta = o.temperature
        self.loss_reweight_tau, self.rapidun_tokens = o.loss_reweight_tau, o.rapidun_tokens
        self.tokens_processed = 0
        self._log_sums: dict[str, float] = {}
        self._log_count = 0
        self._started = time.perf_counter()
        self.ref_nll = self._reference_nll(dataset) if o.method == "npo" else None

    def _reference_nll(self, dataset: UnlearnDataset) -> torch.Tensor:
        """NLL_sum of every forget example under the model before unlearning (NPO's pi_ref)."""
        collate = self.data_collator if isinstance(self.data_collator, UnlearnCollator) else UnlearnCollator()
        rows = self.args.per_device_eval_batch_size
        batches = (
            {k: v.to(self.args.device) for k, v in collate.pad(dataset.forget[s : s + rows]).items()}
            for s in range(0, len(dataset), rows)
        )
        # Under the same autocast as training, so that pi / pi_ref = 1 at the first step.
        with self.autocast_smart_context_manager():
            return losses.reference_nll(self.model, batches)

    def get_decay_parameter_names(self, model) -> list[str]:
        # Decoupled weight decay would move the masked-out entries of SIMU-masked tensors.
        return [] if self._mask_handles else super().get_decay_parameter_names(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, retain = inputs["forget"], inputs.get("retain")
        if self._router_aux is not None:
            self._router_aux.arm()
        differing = self.method == "rapidun" and self.rapidun_tokens == "differing"
        f = (losses.answer_token_nll if differing else losses.sequence_nll)(model, forget)
        w = forget.get("weights")
        if self.loss_reweight_tau is not None:
            w = (w if w is not None else 1.0) * loss_reweight(f.mean.detach().cpu(), self.loss_reweight_tau).to(
                f.sum.device
            )
        ref = self.ref_nll[forget["index"].cpu()].to(f.sum.device) if self.method == "npo" else None
        nll = losses.answer_token_nll if differing else losses.sequence_nll
        clean = nll(model, forget["clean"]) if self.method == "rapidun" and "clean" in forget else None
        forget_term = forget_loss(self, f, w, ref_sum=ref, clean=clean)
        loss = self.gamma * forget_term
        logs = {"forget_loss": forget_term.item(), "forget_nll": f.mean.mean().item()}
        if self.options.uses_retain:
            retain_term = retain_loss(self, model, retain, retain.get("weights"))
            loss = loss + self.alpha * retain_term
            logs["retain_loss"] = retain_term.item()
        if self._router_aux is not None:  # coef * the load-balancing loss of each forward with gradient
            aux = self._router_aux.take().to(loss.device)
            loss = loss + aux
            logs["router_aux_loss"] = aux.item()
        self.tokens_processed += int(forget["attention_mask"].sum()) + (
            int(retain["attention_mask"].sum()) if retain else 0
        )
        for k, v in logs.items():
            self._log_sums[k] = self._log_sums.get(k, 0.0) + v
        self._log_count += 1
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"unlearning loss became {loss.item()} at step {self.state.global_step}; lower the learning rate"
            )
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._log_count:
            logs.update({k: v / self._log_count for k, v in self._log_sums.items()})
            self._log_sums, self._log_count = {}, 0
        logs["tokens"] = self.tokens_processed
        logs["unlearn_wall_s"] = time.perf_counter() - self._started
        super().log(logs, *args, **kwargs)
