"""Hook-based capture of layer inputs and output gradients in one batched backward.

For every selected layer (``nn.Linear``, GPT-2 ``Conv1D``, PEFT LoRA ``lora_A`` / ``lora_B``,
which are ``nn.Linear``) a forward hook keeps the layer input ``A: (B, T, d_in)`` and a
tensor hook on its output receives ``G = dL/dy: (B, T, d_out)`` during backward, where
L = sum_i L_i and L_i is example i's mean token cross-entropy over its answer tokens
(labels != -100, causal shift). Each G row therefore belongs to one example only, and
``on_layer(layer, A, G, mask)`` is called as soon as the layer's G is ready, so a
consumer can project and drop it before the next layer's gradient arrives.

No parameter gradient is computed: while capturing, every parameter has
``requires_grad=False`` and the graph starts at the lowest point that every captured layer
lies above (``backward_start``): the input of the lowest decoder block holding a captured
layer, the LM head's input when only the head is captured, the input embeddings' output
otherwise. Nothing below that point is differentiated. The model
is returned exactly as it was found (parameters, ``requires_grad`` flags, ``.grad``,
train/eval mode of every module, hooks).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batching import batch_ids, batch_positions
from .lm import IGNORE_INDEX, fused_head, model_inputs, shifted_labels
from .ops.linear_cross_entropy import linear_cross_entropy

try:  # GPT-2 style Conv1D: y = x @ W + b with W: (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

log = logging.getLogger(__name__)

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


@dataclass(frozen=True)
class Layer:
    """A captured layer. ``bias``: whether the bias gradient is captured (a constant 1 appended to a)."""

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    bias: bool

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores (d_in, d_out)
    return d_in, d_out


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters used by more than one module (e.g. an LM head tied to the embeddings)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def select_layers(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    include_bias: bool = True,
) -> list[Layer]:
    """Layers to capture, in module order.

    ``include``: regexes searched in the module name; None selects every supported layer
    whose weight is trainable (every one, when none is trainable), which for a PEFT
    model means its LoRA layers. ``exclude`` regexes remove layers. Layers whose weight
    is shared with another module (a tied LM head) are never captured: the hook would
    see only part of that parameter's gradient.
    """
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no supported layer (torch.nn.Linear, transformers Conv1D, "
            "PEFT LoRA lora_A/lora_B): nothing to capture"
        )
    shared = _shared_parameter_ids(model)
    tied = [n for n, m in candidates if id(m.weight) in shared]
    candidates = [(n, m) for n, m in candidates if id(m.weight) not in shared]
    if include is not None:
        pats = _compile(include, "include")
        chosen = [(n, m) for n, m in candidates if any(p.search(n) for p in pats)]
        tied_hits = [n for n in tied if any(p.search(n) for p in pats)]
        if not chosen and tied_hits:
            raise ValueError(
                f"{tied_hits[:3]} share their weight with another module (tied to the input embeddings): a hook "
                "sees only this layer's part of that parameter's gradient, so tied layers are not captured. "
                "Untie them (config.tie_word_embeddings=False) or choose other layers."
            )
    else:
        chosen, why = _default_layers(candidates)
    if exclude:
        pats = _compile(exclude, "exclude")
        chosen = [(n, m) for n, m in chosen if not any(p.search(n) for p in pats)]
    if not chosen:
        names = ", ".join(n for n, _ in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(
            f"no layer matches include={include!r} exclude={exclude!r}; supported layers of this model "
            f"include: {names}. Adjust the regexes in ProjectionConfig(include=..., exclude=...)."
        )
    names = [n for n, _ in chosen]
    log.info(
        "capturing %d layers (%s): %s",
        len(names),
        "include/exclude regexes" if include is not None else why,
        ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""),
    )
    return [Layer(n, m, *_dims(m), bias=include_bias and getattr(m, "bias", None) is not None) for n, m in chosen]


_LORA = re.compile(r"(^|\.)lora_[AB](\.|$)")


def _compile(patterns, which: str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"the {which} regex {p!r} is invalid ({exc}); fix ProjectionConfig.{which}") from None
    return out


def _default_layers(candidates: list[tuple[str, nn.Module]]) -> tuple[list[tuple[str, nn.Module]], str]:
    """Default selection: a PEFT model's LoRA layers (trainable or not: ``PeftModel.from_pretrained``
    loads them frozen), else the trainable layers, else every supported layer (with a warning)."""
    lora = [(n, m) for n, m in candidates if _LORA.search(n)]
    if lora:
        return lora, "default: the LoRA layers of the PEFT model"
    trainable = [(n, m) for n, m in candidates if m.weight.requires_grad]
    if trainable:
        return trainable, "default: the layers whose weight is trainable"
    log.warning(
        "no supported layer has a trainable weight and the model has no LoRA layers: capturing every "
        "supported layer (%d); choose layers with ProjectionConfig(include=...)",
        len(candidates),
    )
    return candidates, "default: every supported layer, none is trainable"


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A validated batch on the model's device. ``ids``: one id per example; ``positions``: their
    indices in data order when the batch says (``fastinfluence.batching``), else None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    ids: list
    positions: list[int] | None = None


@dataclass(frozen=True)
class BatchLimits:
    """What a model accepts: token ids < vocab_size, at most max_positions tokens; pad/eos ids (or None)."""

    vocab_size: int | None = None
    max_positions: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> BatchLimits:
        cfg = getattr(model, "config", None)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None) or getattr(cfg, "vocab_size", None)
        # Only absolute position embeddings have a hard limit (rotary ones extrapolate).
        positions = getattr(cfg, "n_positions", None) if hasattr(cfg, "n_positions") else None
        if positions is None and getattr(cfg, "model_type", None) in ("opt", "gpt_bigcode", "bloom", "bert"):
            positions = getattr(cfg, "max_position_embeddings", None)
        eos = getattr(cfg, "eos_token_id", None)
        return cls(vocab, positions, getattr(cfg, "pad_token_id", None), eos if isinstance(eos, int) else None)


def _infer_mask(input_ids: torch.Tensor, limits: BatchLimits, ids: list) -> torch.Tensor:
    """Attention mask of a batch given without one: padding is the leading or trailing run of
    ``pad_token_id``. Refused where padding cannot be told from content."""
    pad = limits.pad_token_id
    ones = torch.ones_like(input_ids, dtype=torch.long)
    if pad is None or not bool((input_ids == pad).any()):
        return ones
    is_pad = input_ids == pad
    lead = is_pad.long().cumprod(1).bool()
    trail = is_pad.flip(1).long().cumprod(1).flip(1).bool()
    if limits.eos_token_id == pad or bool((is_pad & ~lead & ~trail).any()):
        rows = torch.nonzero((is_pad & ~lead & ~trail).any(1)).flatten().tolist() or [0]
        raise ValueError(
            f"the batch has no attention_mask and examples {[ids[i] for i in rows[:5]]} hold the pad token "
            f"{pad} where it cannot be told from text (inside the sequence, or pad = eos): pass attention_mask"
        )
    log.warning(
        "the batch has no attention_mask: taking the leading/trailing pad tokens (id %d) as padding; "
        "pass attention_mask to say so explicitly",
        pad,
    )
    return (~(lead | trail)).long()


def prepare_batch(batch: dict, device: torch.device, start: int, limits: BatchLimits | None = None) -> Batch:
    """Validate an HF-style batch (``input_ids``, optional ``attention_mask`` / ``labels`` / ``ids``).

    Missing labels mean every attended token is a target; labels at padding are ignored (see
    ``_label_positions`` for the labelled final eos of eos-padded batches).
    ``start`` is the running index of the batch's first example (default ids). A missing
    attention mask is inferred from the model's ``pad_token_id`` (see ``_infer_mask``);
    ``limits`` (``BatchLimits.of(model)``) also checks token ids and lengths, naming the example.
    """
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError(
            f"a batch must be a dict with 'input_ids' (and 'attention_mask', 'labels'), got {type(batch).__name__}"
        )
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)
    limits = limits or BatchLimits()
    ids = batch_ids(batch, shape[0], start)
    mask = batch.get("attention_mask")
    mask = _infer_mask(input_ids, limits, ids) if mask is None else torch.as_tensor(mask)
    given = batch.get("labels")
    labels = input_ids.clone() if given is None else torch.as_tensor(given)
    for key, t in (("input_ids", input_ids), ("attention_mask", mask), ("labels", labels)):
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(
                f"batch {key} has dtype {t.dtype}; it must hold integers (token ids, 0/1, -100 for ignored labels)"
            )
        if tuple(t.shape) != shape:
            raise ValueError(f"batch {key} has shape {tuple(t.shape)} but input_ids has {shape}; they must match")
    labels = labels.masked_fill(~_label_positions(mask.to(labels.device) != 0, given is not None), IGNORE_INDEX)
    _check_limits(input_ids, mask, labels, limits, ids)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    if bool((counts == 0).any()):
        bad = [ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise ValueError(
            f"examples {bad[:5]} have no label tokens (labels != -100 after the causal shift): "
            "their loss is undefined. Drop them or give them answer tokens."
        )
    return Batch(input_ids.to(device), mask.to(device), labels.to(device), ids, batch_positions(batch, shape[0]))


def _label_positions(attended: torch.Tensor, given: bool) -> torch.Tensor:
    """(B, T) bool: where a label may be a target.

    Labels made from ``input_ids`` count at attended tokens only. Given labels also count at a
    masked token inside the sequence and at the first masked token after it: codebases that pad
    with eos mask every eos (``attention_mask = input_ids != pad``) yet label the answer's final
    eos, and the model's own loss takes it. Labels in the leading padding, and past that first
    trailing token, never count.
    """
    if not given:
        return attended
    pos = torch.arange(attended.shape[1], device=attended.device)
    first = torch.where(attended, pos, attended.shape[1]).min(1, keepdim=True).values
    last = torch.where(attended, pos, -1).max(1, keepdim=True).values
    return attended | ((pos > first) & (pos <= last + 1))


def _check_limits(input_ids, mask, labels, limits: BatchLimits, ids: list) -> None:
    def name(rows):
        return [ids[i] for i in torch.nonzero(rows).flatten().tolist()[:5]]

    attended = mask != 0
    if limits.vocab_size is not None:
        bad = ((input_ids >= limits.vocab_size) | (input_ids < 0)) & attended
        if bool(bad.any()):
            raise ValueError(
                f"examples {name(bad.any(1))} hold token ids outside 0..{limits.vocab_size - 1} (the model's "
                f"vocabulary, "
                f"max id {int(input_ids[bad].max())}): encode them with this model's tokenizer"
            )
        bad_labels = (labels >= limits.vocab_size) | ((labels < 0) & (labels != IGNORE_INDEX))
        if bool(bad_labels.any()):
            raise ValueError(
                f"examples {name(bad_labels.any(1))} have labels outside 0..{limits.vocab_size - 1} "
                "and not -100: labels are token ids, -100 where no loss is taken"
            )
    if limits.max_positions is not None and input_ids.shape[1] > limits.max_positions:
        long = attended.sum(1) > limits.max_positions
        raise ValueError(
            f"examples {name(long) or ids[:1]} are {input_ids.shape[1]} tokens long (with padding) but the model takes "
            f"at most {limits.max_positions} positions: truncate them (max_length <= {limits.max_positions})"
        )


def iter_batches(batches: Iterable[dict], device: torch.device, model: nn.Module | None = None) -> Iterator[Batch]:
    """Validated batches (checked against ``model``'s vocabulary and positions when given); raises if
    the iterable holds no example."""
    seen = 0
    limits = BatchLimits.of(model) if model is not None else None
    for raw in batches:
        batch = prepare_batch(raw, device, seen, limits)
        seen += batch.input_ids.shape[0]
        yield batch
    if seen == 0:
        raise ValueError("the batches hold no example: pass a non-empty DataLoader or iterable of batch dicts")


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean token cross-entropy of each example over its answer tokens (causal shift)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 models
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(dtype), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    return ce.sum(1) / (labels != IGNORE_INDEX).sum(1)


def forward_losses(model: nn.Module, batch: Batch, head=None) -> torch.Tensor:
    """(B,) per-example losses with autograd. ``head``: ``fused_head(model)`` to compute them
    from the last hidden states with ``ops.linear_cross_entropy`` (no B x T x V logits)."""
    if head is None:
        logits = model(**model_inputs(model, batch.input_ids, batch.attention_mask)).logits
        return per_example_loss(logits, batch.labels)
    decoder, lm_head, softcap = head
    hidden = decoder(**model_inputs(decoder, batch.input_ids, batch.attention_mask)).last_hidden_state
    labels = shifted_labels(batch.labels)
    tokens = linear_cross_entropy(
        hidden.flatten(0, 1).to(lm_head.weight.dtype),
        lm_head.weight,
        labels.flatten(),
        bias=lm_head.bias,
        softcap=softcap,
    ).view(labels.shape)
    return tokens.sum(1) / (labels != IGNORE_INDEX).sum(1)


# ---------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------

OnLayer = Callable[[Layer, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _block_index(name: str, blocks: dict[str, nn.ModuleList]) -> tuple[str, int] | None:
    """(blocks name, index) of the decoder block holding module ``name``, or None."""
    for prefix in blocks:
        head = prefix + "."
        if name.startswith(head):
            index = name[len(head) :].split(".", 1)[0]
            if index.isdigit():
                return prefix, int(index)
    return None


def backward_start(model: nn.Module, layers: list[Layer]) -> tuple[str, nn.Module]:
    """Where the backward needs to start so that every captured layer still gets its G.

    Returns ``("block", module)``: the lowest decoder block (an item of the model's largest
    ``nn.ModuleList``) holding a captured layer, when all of them lie in such blocks;
    ``("head", module)``: the LM head, when it is the only captured layer; otherwise
    ``("embeddings", module)``: the input embeddings. Output gradients of the captured
    layers depend only on what lies above them, so cutting the graph at that module's
    input leaves every G unchanged and skips the backward through everything below.
    """
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers and out is not None and all(l.module is out for l in layers):
        return "head", out
    lists = {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0}
    if layers and lists:
        name = max(lists, key=lambda n: sum(p.numel() for p in lists[n].parameters()))
        where = [_block_index(l.name, {name: lists[name]}) for l in layers]
        if all(w is not None for w in where):
            return "block", lists[name][min(w[1] for w in where)]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError(
            f"{type(model).__name__} has no get_input_embeddings(): cannot start the backward at its inputs"
        )
    return "embeddings", embeddings


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


def _start_graph(kind: str, module: nn.Module):
    """A hook making ``module``'s input (``block``, ``head``) or output (``embeddings``) the graph's leaf."""
    if kind == "embeddings":
        return module.register_forward_hook(lambda _m, _inputs, output: _leaf(output))

    def pre_hook(_m, args, kwargs):
        if args and torch.is_tensor(args[0]):
            return (_leaf(args[0]), *args[1:]), kwargs
        if torch.is_tensor(kwargs.get("hidden_states")):
            return args, {**kwargs, "hidden_states": _leaf(kwargs["hidden_states"])}
        raise RuntimeError(f"{type(module).__name__} got no hidden-states tensor to start the backward at")

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextlib.contextmanager
def frozen_for_capture(model: nn.Module, layers: list[Layer] | None = None) -> Iterator[None]:
    """Eval mode, no parameter gradients, the graph started at ``backward_start(model, layers)``
    (at the input embeddings' output without ``layers``); all restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handle = _start_graph(*backward_start(model, layers or []))
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


class LayerHooks:
    """Hooks on the selected layers that hand each one's (A, G, mask) to ``on_layer`` in the backward.

    A forward hook keeps the layer input A (detached: no copy, autograd keeps it anyway) and
    puts a tensor hook on the output, which receives G = dL/dy when the backward reaches it.
    The hooks act only while armed: ``arm(mask)`` before a forward pass whose backward is to
    be captured (``mask``: (B, T) bool, True at attended tokens), ``check()`` after its
    backward (raises when a layer was skipped, ran twice or got no gradient). Used by
    ``Capture`` for extraction and by the training callback on the training step itself.
    """

    def __init__(self, layers: list[Layer], on_layer: OnLayer):
        self.layers = layers
        self.on_layer = on_layer
        self.mask: torch.Tensor | None = None
        self.calls: dict[str, int] = {}
        self.received: set[str] = set()
        self._handles: list = []

    def __enter__(self) -> LayerHooks:
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.mask = None

    def arm(self, mask: torch.Tensor) -> None:
        self.mask, self.calls, self.received = mask, {}, set()

    @property
    def complete(self) -> bool:
        """Every layer's G of the armed pass has arrived."""
        return len(self.received) == len(self.layers)

    def _forward_hook(self, layer: Layer):
        def hook(_module, inputs, output):
            mask = self.mask
            if mask is None:
                return
            self.calls[layer.name] = self.calls.get(layer.name, 0) + 1
            if self.calls[layer.name] > 1:
                raise RuntimeError(
                    f"layer {layer.name} ran more than once in one forward pass; layers shared across "
                    "positions of the network are not supported: exclude it (ProjectionConfig.exclude)"
                )
            a = inputs[0].detach()
            if a.shape[:-1].numel() != mask.numel():
                raise RuntimeError(
                    f"layer {layer.name} saw input of shape {tuple(a.shape)}, expected (B, T, d) with "
                    f"(B, T) = {tuple(mask.shape)}: only token-wise layers can be captured; exclude it"
                )
            if not output.requires_grad:
                raise RuntimeError(f"layer {layer.name}'s output does not depend on the input embeddings; exclude it")
            # Some models (OPT) run their MLP on flattened (B * T, d) tokens.
            a = a.reshape(*mask.shape, a.shape[-1])

            def grad_hook(g):
                self.received.add(layer.name)
                self.on_layer(layer, a, g.detach().reshape(*mask.shape, g.shape[-1]), mask)

            output.register_hook(grad_hook)

        return hook

    def check(self) -> None:
        missing = [layer.name for layer in self.layers if layer.name not in self.calls]
        if missing:
            raise RuntimeError(f"layers {missing[:5]} were not called in the forward pass; exclude them")
        missing = [layer.name for layer in self.layers if layer.name not in self.received]
        if missing:
            raise RuntimeError(
                f"layers {missing[:5]} ran but their outputs got no gradient (no path to the loss); exclude them"
            )


class Capture:
    """Runs forward + backward on batches and hands each selected layer's (A, G, mask) to ``on_layer``.

    Use inside ``frozen_for_capture(model)``. ``A``: (B, T, d_in) layer input, ``G``:
    (B, T, d_out) output gradient, both in the model dtype; ``mask``: (B, T) bool, True at
    attended tokens (padding rows of A and G must be ignored).
    """

    def __init__(self, model: nn.Module, layers: list[Layer], autocast: torch.dtype | None = None):
        self.model = model
        self.layers = layers
        # Low-precision forward (``ProjectionConfig.autocast``); the backward runs outside autocast.
        self.autocast = autocast
        # Without a hook on the LM head, its logits need never exist: the loss comes from
        # the hidden states through the chunked linear cross-entropy.
        head = fused_head(model)
        self.head = head if head is not None and all(l.module is not head[1] for l in layers) else None

    def run(self, batch: Batch, on_layer: OnLayer) -> torch.Tensor:
        """One forward + backward on ``batch``; returns the (B,) per-example losses."""
        with LayerHooks(self.layers, on_layer) as hooks:
            hooks.arm(batch.attention_mask.bool())
            with torch.enable_grad():
                with autocast_forward(batch.input_ids.device, self.autocast):
                    losses = forward_losses(self.model, batch, self.head)
                losses.sum().backward()
            hooks.check()
        losses = losses.detach()
        if not bool(torch.isfinite(losses).all()):
            raise FloatingPointError(
                f"non-finite loss for examples {batch.ids}: check the model and inputs (eager attention in "
                "float64 turns fully padded rows into NaN in some transformers versions: use SDPA attention "
                "or right padding)"
            )
        return losses


def autocast_forward(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device`` (a no-op context for None): wraps forward passes only."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
