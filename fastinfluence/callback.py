"""Per-example gradient features captured inside ``Trainer.train()``, from the training step itself.

Two lines added to a user's Trainer::

    callback = fastinfluence.InfluenceCallback("runs/train-features", ProjectionConfig(rank_in=16, rank_out=16))
    Trainer(model, args, train_dataset=data, callbacks=[callback]).train()   # args: remove_unused_columns=False

No second forward or backward: the layer hooks of extraction (``capture.LayerHooks``) sit on
the training forward, and each selected layer's (A, G) is projected with ``ops.project`` as
soon as the training backward reaches it. Parameter gradients and the optimizer step are
untouched.

**Per-example scaling.** Extraction backpropagates sum_i L_i, L_i = mean of example i's
answer-token cross-entropies (n_i tokens: ``labels[1:] != -100``). Training backpropagates
c * sum_{i, t} CE_it instead: the model's loss is the token sum over N tokens
(``num_items_in_batch`` when the Trainer passes it: every micro-batch of the optimizer step,
every rank; else the micro-batch's own answer tokens), and the Trainer scales it further
(1 / gradient_accumulation_steps when the model does not take ``num_items_in_batch``, the
number of ranks when tokens are averaged across devices, the fp16 loss scale). That second
factor ``u = d(backpropagated loss) / d(outputs.loss)`` is read by a tensor hook on the
model's loss, so c = u / N, and the captured G restricted to example i is c * n_i * dL_i/dy.
Hence, exactly::

    per-example gradient of L_i = (N / n_i) * (1 / u) * (captured G restricted to example i)

(u = 1 / gradient_accumulation_steps in the plain no-``num_items_in_batch`` case, i.e. the
accumulation factor multiplies back in). The projection is linear in G, so the scale is
applied to each feature row after projection. This holds when the training loss is the
model's own token-mean cross-entropy on ``labels`` (``outputs.loss``); a Trainer whose loss
adds other terms, or uses label smoothing or ``compute_loss_func``, is refused or changes G.
Training-mode features include dropout's noise; extraction (eval mode) has none.

**Example ids.** Each row needs the id of its example. Give the dataset an ``id`` (or ``ids``)
column of ints or strings and keep it with ``TrainingArguments(remove_unused_columns=False)``;
the collator must pass it through: ``fastinfluence.data.Collator(pad_token_id)`` over
``fastinfluence.data.encode`` examples keeps int and str ids; transformers'
``default_data_collator`` keeps int ids only (it drops str columns). The callback removes it
from the model's inputs before the forward, so the model never sees it.

**Stores.** Rows are written per checkpoint interval: at every checkpoint the Trainer saves
(``every=None``) or every ``every`` optimizer steps, into ``<output_dir>/step-<last step>``,
a ``FeatureStore`` whose rows are the examples trained in steps (previous interval's end,
last step], one row per time an example was trained, with ``meta["steps"]`` (the optimizer step
of each row), ``meta["lr"]`` (its learning rate), ``meta["first_step"]``, ``meta["last_step"]`` and
``meta["interval_lr"]`` (the mean learning rate of every optimizer step of the interval, captured or not).
Its fingerprint is that of the weights at the end of the interval (``checkpoint-<last step>``),
so queries extracted from that checkpoint score against it without a mismatch error.
Resuming training from a checkpoint replays the same steps and rewrites nothing that is
complete (``write_store`` resumes); an interval store with other examples is refused. Under
``torchrun`` each rank captures the examples it trains; the rows of an interval are gathered
(rank order) and the ranks write its store together, rank 0 the manifest.

**Adam update directions (LESS).** With ``features=("gradient", "adam")`` (or ``("adam",)``)
each interval also gets ``<output_dir>/adam/step-<last step>``, whose rows are the projected
Adam update direction of each example's own gradient at the step it was trained (Xia et al.
2024, LESS); the math, and why it is formed in the training step, is in ``fastinfluence.adam``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from . import distributed as dist
from . import ops
from .adam import adam_layers, adam_rows, layer_moments  # noqa: F401 (adam_rows: fastinfluence.callback.adam_rows)
from .batching import batch_ids
from .capture import Layer, LayerHooks
from .config import ProjectionConfig
from .extract import GradientExtractor
from .features import Features, cat_features
from .lm import IGNORE_INDEX
from .ops.routed import project_routed

STEP_PREFIX = "step-"
log = logging.getLogger(__name__)
FEATURES = ("gradient", "adam")  # what an interval store's rows are: projected gradients, Adam update directions
DENSE_LIMIT = 1 << 22


def _kind_dir(output_dir: str | os.PathLike, kind: str) -> Path:
    if kind not in FEATURES:
        raise ValueError(f"unknown feature kind {kind!r}; choose from {FEATURES}")
    root = Path(output_dir)
    return root if kind == "gradient" else root / kind


def interval_stores(output_dir: str | os.PathLike, kind: str = "gradient") -> list[Path]:
    """The interval stores of one feature ``kind`` an InfluenceCallback wrote under ``output_dir``, in step order."""
    root = _kind_dir(output_dir, kind)
    if not root.is_dir():
        raise FileNotFoundError(f"no InfluenceCallback {kind} output at {root}: the directory does not exist")
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


class _Pending:
    """One micro-batch being captured: its rows fill in as the backward reaches each layer."""

    def __init__(self, batch: dict, ids: list, rows: dict, counts: torch.Tensor, n_tokens, step: int, lr: float):
        self.batch, self.ids, self.rows, self.step, self.lr = batch, ids, rows, step, lr
        self.counts = counts  # (B,) answer tokens n_i of each example
        self.n_tokens = n_tokens  # N, the denominator of the model's token-mean loss
        self.upstream: torch.Tensor | None = None  # u = d(backpropagated loss) / d(outputs.loss)
        self._scale: torch.Tensor | None = None

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        """(B,) N / (n_i u): turns the captured G of example i into the gradient of L_i (module docstring)."""
        if self._scale is None:
            if self.upstream is None:
                raise RuntimeError(
                    "the training loss's backward never reached outputs.loss: no features for this batch"
                )
            counts = self.counts.to(dtype)
            N = torch.as_tensor(self.n_tokens, dtype=dtype, device=counts.device)
            self._scale = torch.where(counts > 0, N / (counts.clamp_min(1) * self.upstream.to(dtype)), 0.0)
        return self._scale


class _Interval:
    """Captured micro-batches not yet written: the batches (for the store's resume checks) and their Features."""

    def __init__(self, kinds: tuple[str, ...]):
        self.batches: list[dict] = []
        self.features: dict[str, list[Features]] = {k: [] for k in kinds}
        self.steps: list[int] = []
        self.lr: list[float] = []
        self.step_lr: dict[int, float] = {}  # every optimizer step of the interval (captured or not) -> its lr

    def __len__(self) -> int:
        return len(self.batches)


class InfluenceCallback(TrainerCallback):
    """Projected per-example gradients (and Adam update directions) of every training example, from the
    training step's own backward.

    Args:
        output_dir: where the interval stores go (see module docstring for the layout).
        config: which layers and how they are projected (``ProjectionConfig``; factorized mode).
        every: write a store every ``every`` optimizer steps; None (default) at every
            checkpoint the Trainer saves (and at the end of training).
        shard_rows: rows per shard of the stores.
        features: what the rows are: ``"gradient"`` (projected gradients, TracIn-CP) and/or
            ``"adam"`` (projected Adam update directions, LESS; needs an Adam/AdamW optimizer).
        dense_limit: the most numbers d_out x (d_in + bias) of one layer's dense per-example
            gradient that ``"adam"`` forms (see module docstring).
        window: capture only the last ``window`` optimizer steps of each interval (None: every
            step). With one epoch's steps, each example gets one row per interval, taken close to
            the checkpoint its queries come from (TracIn-CP's and LESS's setting), and the steps
            outside the windows train at full speed. Needs ``every`` or ``save_strategy="steps"``.
        normalizer: a fixed ``Normalizer`` (or its path) folded into the projections, as for
            ``GradientExtractor`` (features of g / sqrt(V); see ``normalizer.py``); ``"gradient"``
            features only (``"adam"`` rows are Adam-normalised already).

    An interval's rows stay in host memory until its store is written (rows x D x 4 bytes,
    D = ``callback.extractor.dim``): choose ``every`` (or ``save_steps``) to bound it.
    Rows of a store are in the order the examples were trained; ``FeatureStore.ids`` names
    them (an example trained twice in one interval has two rows).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        config: ProjectionConfig | None = None,
        every: int | None = None,
        shard_rows: int = 4096,
        features: tuple[str, ...] | list[str] = ("gradient",),
        dense_limit: int = DENSE_LIMIT,
        window: int | None = None,
        normalizer=None,
    ):
        features = (features,) if isinstance(features, str) else tuple(features)
        if not features or set(features) - set(FEATURES) or len(set(features)) != len(features):
            raise ValueError(f"features must name some of {FEATURES} once each, got {features!r}")
        if isinstance(dense_limit, bool) or not isinstance(dense_limit, int) or dense_limit < 1:
            raise ValueError(f"dense_limit must be a positive number of elements, got {dense_limit!r}")
        if normalizer is not None and "adam" in features:
            raise ValueError(
                "normalizer= scales the 'gradient' features; the 'adam' features (LESS) are divided by Adam's "
                "second moment already: capture them without a normalizer"
            )
        self.features = features
        self.dense_limit = dense_limit
        self.output_dir = Path(output_dir)
        self.normalizer = normalizer
        self.config = config or ProjectionConfig()
        if self.config.mode != "factorized":
            raise ValueError("InfluenceCallback captures factorized features: use ProjectionConfig(mode='factorized')")
        if self.config.autocast is not None:
            raise ValueError(
                "InfluenceCallback captures the Trainer's own forward, so ProjectionConfig.autocast does not apply: "
                "leave it None and set the Trainer's bf16=True / fp16=True instead"
            )
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive number of optimizer steps or None, got {every!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive number of optimizer steps or None, got {window!r}")
        self.every = every
        self.window = window
        self._interval_steps: int | None = None
        self._max_steps = 0
        self.shard_rows = shard_rows
        self.extractor: GradientExtractor | None = None
        self._model: nn.Module | None = None
        self._optimizer = None
        self._hooks: LayerHooks | None = None
        self._handles: list = []
        self._pending: _Pending | None = None
        self._interval = _Interval(self.features)
        self._step = 0
        self._adam: dict[str, tuple] = {}  # layer name -> (its parameters and their shares, parameter group)

    # ------------------------------------------------------------------------- Trainer events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("InfluenceCallback needs the model: add it to a transformers Trainer (callbacks=[...])")
        if getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False):
            raise ValueError(
                "InfluenceCallback cannot capture with activation_checkpointing / gradient_checkpointing on (layers "
                "run again in the backward): turn it off or extract post hoc with GradientExtractor"
            )
        self._interval_steps = (self.every or _save_steps(args, state)) if self.window is not None else None
        self._max_steps = state.max_steps
        self._remove_hooks()
        self._model, self._optimizer = model, optimizer
        self.extractor = GradientExtractor(model, self.config, normalizer=self.normalizer)
        # The auxiliary loss's gradient reaches the routers and, through the hidden states, every layer
        # below them: refused whatever layers are captured.
        if getattr(getattr(model, "config", None), "output_router_logits", False):
            raise ValueError(
                "InfluenceCallback reads per-example gradients from the model's own loss, to which "
                "output_router_logits=True adds the router auxiliary loss: set "
                "model.config.output_router_logits = False"
            )
        if "adam" in self.features:
            self._adam = adam_layers(self.extractor.layers, optimizer, self.dense_limit)
        self._hooks = LayerHooks(self.extractor.layers, self._on_layer).__enter__()
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        self._step = state.global_step
        self._interval = _Interval(self.features)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if state.global_step > 0:
            self._check_resume(state.global_step)

    def _check_resume(self, step: int) -> None:
        """A run resumed at ``step``: say in one line when the interval stores end before it (rows of
        those steps were never written: a run stopped by an older version between a checkpoint and
        its store, or stores deleted)."""
        for kind in self.features:
            stores = interval_stores(_kind_dir(self.output_dir, kind))
            last = int(stores[-1].name[len(STEP_PREFIX) :]) if stores else 0
            if last < step:
                log.warning(
                    "InfluenceCallback: training resumes at step %d but the %s stores under %s end at step %d: the "
                    "rows of steps %d..%d are missing; resume from checkpoint-%d (or earlier) to capture them",
                    step,
                    kind,
                    _kind_dir(self.output_dir, kind),
                    last,
                    last + 1,
                    step,
                    last,
                )

    def on_substep_end(self, args, state, control, **kwargs):
        self._finish_micro_batch()

    def on_step_end(self, args, state, control, **kwargs):
        self._finish_micro_batch()
        self._step = state.global_step
        # An interval's rows are written before the checkpoint that ends it (the Trainer saves after
        # this event when ``should_save`` is set): a run killed after that checkpoint has its rows,
        # and one killed before it replays the interval on resume.
        # With ``every``, a checkpoint between two of its boundaries ends the interval there too.
        if control.should_save or (self.every is not None and state.global_step % self.every == 0):
            self.flush()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.flush()

    def on_save(self, args, state, control, **kwargs):
        if self.every is None:  # a save asked for after this callback's step event: nothing is lost either
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_micro_batch()
        self.flush()
        self.close()

    # ------------------------------------------------------------------------- hooks

    def close(self) -> None:
        """Remove the hooks from the model (done at the end of training; call it after a failed ``train()``)."""
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        self._pending = None

    def _before_forward(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return None
        if self._pending is not None:
            raise RuntimeError(
                "InfluenceCallback saw a second training forward before the first one's backward finished; it "
                "captures Trainers whose step is one forward and one backward of the model's own loss"
            )
        kwargs = dict(kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if input_ids is None or labels is None:
            raise ValueError(
                "InfluenceCallback needs batches with 'input_ids' and 'labels' whose loss the model computes itself "
                "(no label smoothing or compute_loss_func)"
            )
        key = "ids" if "ids" in kwargs else "id"
        if key not in kwargs:
            raise ValueError(
                "InfluenceCallback found no example ids in the batch: give the dataset an 'id' column (int or str), "
                "keep it with TrainingArguments(remove_unused_columns=False), and use a collator that passes it on "
                "(transformers' default collator drops str ids: data_collator=fastinfluence.data.Collator(pad_id))"
            )
        B = input_ids.shape[0]
        ids = kwargs.pop(key)
        lr = float(self._optimizer.param_groups[0]["lr"]) if self._optimizer is not None else float("nan")
        self._interval.step_lr[self._step + 1] = lr
        if not self._capturing(self._step + 1):
            return args, kwargs
        ids = batch_ids({"ids": ids}, B, 0)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        shifted = labels[:, 1:] != IGNORE_INDEX
        n_tokens = kwargs.get("num_items_in_batch")
        n_tokens = shifted.sum() if n_tokens is None else n_tokens
        batch = {
            "input_ids": input_ids.detach().cpu(),
            "attention_mask": mask.long().cpu(),
            "labels": labels.detach().cpu(),
        }
        rows = {
            k: torch.zeros(B, self.extractor.dim, dtype=self.extractor.dtype, device=input_ids.device)
            for k in self.features
        }
        self._pending = _Pending(batch, ids, rows, shifted.sum(1), n_tokens, self._step + 1, lr)
        self._hooks.arm(mask)
        return args, kwargs

    def _capturing(self, step: int) -> bool:
        """Whether optimizer step ``step`` lies in its interval's capture window."""
        if self.window is None:
            return True
        n = self._interval_steps
        end = min(-(-step // n) * n, self._max_steps) if self._max_steps > 0 else -(-step // n) * n
        return end - step < self.window

    def _after_forward(self, module, args, kwargs, output):
        pending = self._pending
        if pending is None or pending.upstream is not None:
            return None
        loss = output.get("loss") if isinstance(output, dict) else (output[0] if isinstance(output, tuple) else None)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise ValueError("InfluenceCallback needs the model's loss (outputs.loss from labels) with a gradient")

        def upstream(g):
            pending.upstream = g.detach()

        loss.register_hook(upstream)
        return None

    def _on_layer(self, layer: Layer, A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor) -> None:
        pending = self._pending
        ext = self.extractor
        sl = ext.layout[layer.name]
        rows = pending.rows.get("gradient")
        if rows is not None:
            P_in, P_out = ext.projections(layer.name, rows.device, rows.dtype)
            if layer.routed:  # an MoE expert: mask holds the (n,) examples of its routed tokens
                phi = project_routed(A, G, mask, len(rows), P_in, P_out)
            else:
                phi = ops.project(A, G, P_in, P_out, mask)
            rows[:, sl.start : sl.stop] = phi.reshape(len(rows), -1)
        rows = pending.rows.get("adam")
        if rows is not None:
            P_in, P_out = ext.projections(layer.name, rows.device, rows.dtype)
            moments = self._moments(layer, rows.dtype)
            rows[:, sl.start : sl.stop] = adam_rows(
                A, G, mask, layer.bias, pending.scale(rows.dtype), moments, P_in, P_out, routed=layer.routed
            )

    def _moments(self, layer: Layer, dtype: torch.dtype) -> tuple:
        """(exp_avg, exp_avg_sq, t, betas, eps) of the layer as a (d_out, d_in + bias) gradient."""
        state = getattr(self._optimizer, "optimizer", self._optimizer).state  # read anew: loading a state replaces it
        return layer_moments(layer.name, state, *self._adam[layer.name], dtype)

    def _finish_micro_batch(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._hooks.check()
        self._hooks.mask = None
        ext = self.extractor
        for kind, rows in pending.rows.items():
            if kind == "gradient":  # projection is linear in G: the per-example scale goes on the rows
                rows = rows * pending.scale(rows.dtype)[:, None]
            else:  # an example without answer tokens has no gradient, so no direction of its own (not the momentum's)
                rows = rows.masked_fill((pending.counts == 0).to(rows.device)[:, None], 0.0)
            self._interval.features[kind].append(ext._features(rows, pending.ids, None, None, None))
        self._interval.batches.append(dict(pending.batch, ids=pending.ids))
        self._interval.steps += [pending.step] * len(pending.ids)
        self._interval.lr += [pending.lr] * len(pending.ids)

    # ------------------------------------------------------------------------- writing

    def flush(self):
        """Write the captured rows not yet written as the store ``step-<last step>`` of each feature kind;
        returns it (a list of them, one per kind in ``features`` order, with several kinds), or None."""
        from .store import write_features

        interval = _gathered(self._interval)
        if not len(interval):
            self._interval.step_lr.clear()  # an interval with no captured row has no store
            return None
        self._interval = _Interval(self.features)
        step_lr = list(interval.step_lr.values())
        # Every rank flushes here: a sharded model's weights are gathered anew (a fused optimizer's step on
        # DTensors bumps no version counter, so the extractor's cached fingerprint would not notice it).
        self.extractor._sharded_fp = None
        metadata = self.extractor.metadata()  # fingerprint of the weights now: those of the checkpoint at this step
        written = []
        for kind, features in interval.features.items():
            for f in features:
                f.fingerprint = metadata["fingerprint"]
            meta = {
                "source": "InfluenceCallback",
                "features": kind,
                "first_step": interval.steps[0],
                "last_step": interval.steps[-1],
                "steps": interval.steps,
                "lr": interval.lr,
                "interval_lr": sum(step_lr) / len(step_lr),
            }
            path = _kind_dir(self.output_dir, kind) / f"{STEP_PREFIX}{interval.steps[-1]:08d}"
            rows, shard_rows = cat_features(features), self.shard_rows
            written.append(write_features(path, metadata, interval.batches, rows, shard_rows=shard_rows, meta=meta))
        return written[0] if len(written) == 1 else written


def _gathered(interval: _Interval) -> _Interval:
    """Under ``torch.distributed``: every rank's captured rows, in rank order, on every rank (each rank
    trained its own examples; ``write_store`` then splits the writing between the ranks as it does
    for extraction, and rank 0 writes the manifest). One process: ``interval`` itself."""
    if dist.rank_world()[1] == 1:
        return interval
    parts = dist.all_gather_object((interval.batches, interval.features, interval.steps, interval.lr))
    out = _Interval(tuple(interval.features))
    out.step_lr = dict(interval.step_lr)  # the same optimizer steps on every rank
    for batches, features, steps, lr in parts:
        out.batches += batches
        for kind, f in features.items():
            out.features[kind] += f
        out.steps += steps
        out.lr += lr
    return out


def _save_steps(args, state) -> int:
    """Optimizer steps between the Trainer's checkpoints (``save_strategy="steps"``)."""
    if str(getattr(args, "save_strategy", "")).split(".")[-1].lower() != "steps":
        raise ValueError(
            "InfluenceCallback(window=...) needs the interval length: pass every=<steps> or train with "
            "save_strategy='steps'"
        )
    steps = args.save_steps  # a fraction below 1 is a share of the run, as the Trainer reads it
    return int(steps) if steps >= 1 else max(1, math.ceil(state.max_steps * steps))
