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
import dataclasses
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from . import errors, moe
from .batching import Batch, WindowTracker, iter_batches
from .config import ProjectionConfig
from .lm import IGNORE_INDEX, check_causal_lm, fused_head, model_inputs, shifted_labels
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.lm_head_grad import HeadGrad, head_loss_projected
from .sharding import head_call, is_sharded

try:  # GPT-2 style Conv1D: y = x @ W + b with W: (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

log = logging.getLogger(__name__)

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


@dataclass(frozen=True)
class Layer:
    """A captured layer. ``bias``: whether the bias gradient is captured (a constant 1 appended to a).
    ``tied``: its weight is shared with another module (an LM head tied to the input embeddings):
    its features hold this module's share of that weight's gradient, sum_t g_t a_t^T over its own
    use (for a tied head: the classifier-level gradient), not the other module's share.

    Token-wise: its consumer gets (B, T) tokens and a mask. The routed layers of MoE experts are
    ``moe.ExpertLayer`` (``routed`` True): their consumer gets the routed tokens and their examples.
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    bias: bool
    tied: bool = False
    routed: ClassVar[bool] = False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def stored_transposed(module: nn.Module) -> bool:
    """Whether a captured module stores its weight (d_in, d_out), as GPT-2's ``Conv1D`` does;
    ``nn.Linear``, LoRA factors and MoE routers store it (d_out, d_in)."""
    return Conv1D is not None and isinstance(module, Conv1D)


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

    ``include``: regexes searched in the layer name; None selects every supported layer
    whose weight is trainable (every one, when none is trainable), which for a PEFT
    model means its LoRA layers. ``exclude`` regexes remove layers. A layer whose weight
    is shared with another module (a tied LM head) is captured only when ``include`` names
    it, as its own share of that weight's gradient (``Layer.tied``). MoE routers and experts
    (``moe``) are layers too, one per (expert, fused parameter):
    ``model.layers.3.mlp.experts.7.down_proj``. Logs the share of the trainable weight matrices
    captured; warns (once per model) when the default selection leaves some uncaptured.
    """
    candidates = _candidates(model, include_bias)
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no supported layer (torch.nn.Linear, transformers Conv1D, "
            "PEFT LoRA lora_A/lora_B, transformers MoE routers and experts): nothing to capture"
        )
    shared = _shared_parameter_ids(model)
    everything = candidates
    tied = [l for l in candidates if id(l.weight) in shared]
    candidates = [l for l in candidates if id(l.weight) not in shared]
    if include is not None:
        pats = _compile(include, "include")
        chosen = [l for l in candidates if any(p.search(l.name) for p in pats)]
        tied_hits = {l.name for l in tied if any(p.search(l.name) for p in pats)}
        if tied_hits:
            log.info(
                "%s: weight tied to another module (the input embeddings); captured as this module's share of the "
                "tied weight's gradient (for an LM head: the classifier-level gradient sum_t g_t h_t^T)",
                ", ".join(sorted(tied_hits)),
            )
            keep = {l.name for l in chosen} | tied_hits
            chosen = [dataclasses.replace(l, tied=True) if l.name in tied_hits else l for l in everything]
            chosen = [l for l in chosen if l.name in keep]
    else:
        chosen, why = _default_layers(candidates)
        moe.warn_uncapturable(model, candidates)
        if tied:
            log.info(
                "%s: weight tied to another module, not captured by default; name it in ProjectionConfig(include=...) "
                "to capture its share of the tied weight's gradient",
                ", ".join(l.name for l in tied),
            )
    if exclude:
        pats = _compile(exclude, "exclude")
        chosen = [l for l in chosen if not any(p.search(l.name) for p in pats)]
    if not chosen:
        names = ", ".join(l.name for l in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise errors.FastInfluenceError(
            f"no layer matches include={include!r} exclude={exclude!r}; supported layers of this model "
            f"include: {names}. Adjust the regexes in {errors.name('ProjectionConfig.include')} / "
            f"{errors.name('ProjectionConfig.exclude')}.",
            "include",
        )
    moe.refuse_lora_on_experts(model, chosen)
    names = [l.name for l in chosen]
    cover = moe.coverage(model, chosen)
    log.info(
        "capturing %d layers (%s), %.1f%% of the trainable weight matrices (%d of %d weights): %s",
        len(names),
        "include/exclude regexes" if include is not None else why,
        100 * cover.fraction,
        cover.captured,
        cover.total,
        ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""),
    )
    return chosen


def _candidates(model: nn.Module, include_bias: bool) -> list:
    """Every layer that can be captured, in module order: supported modules, MoE routers and experts."""
    routers, lora_experts, out = moe.routers(model), moe.lora_expert_layers(model), []
    for n, m in model.named_modules():
        if id(m) in lora_experts:  # PEFT LoRA on a fused experts parameter: captured from the experts' hooks
            out.append(lora_experts[id(m)])
        elif isinstance(m, SUPPORTED_TYPES):
            out.append(Layer(n, m, *_dims(m), bias=include_bias and getattr(m, "bias", None) is not None))
        elif id(m) in routers:
            out.append(Layer(n, m, *routers[id(m)], bias=include_bias and getattr(m, "bias", None) is not None))
        elif moe.is_experts(m):
            out.extend(moe.expert_layers(n, m, include_bias))
    return out


_LORA = re.compile(r"(^|\.)lora_[AB](\.|$)")


def _compile(patterns, which: str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise errors.FastInfluenceError(
                f"the {which} regex {p!r} is invalid ({exc}); fix {errors.name('ProjectionConfig.' + which)}", which
            ) from None
    return out


def _default_layers(candidates: list) -> tuple[list, str]:
    """Default selection: a PEFT model's LoRA layers (trainable or not: ``PeftModel.from_pretrained``
    loads them frozen), else the trainable layers, else every supported layer (with a warning)."""
    lora = [l for l in candidates if _LORA.search(l.name)]
    if lora:
        return lora, "default: the LoRA layers of the PEFT model"
    trainable = [l for l in candidates if (l.parameter if l.routed else l.weight).requires_grad]
    if trainable:
        return trainable, "default: the layers whose weight is trainable"
    log.warning(
        "no supported layer has a trainable weight and the model has no LoRA layers: capturing every "
        "supported layer (%d); choose layers with ProjectionConfig(include=...)",
        len(candidates),
    )
    return candidates, "default: every supported layer, none is trainable"


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
    from the last hidden states with ``ops.linear_cross_entropy`` (no B x T x V logits), inside
    the head's forward on a sharded model (``sharding.head_call``)."""
    if head is None:
        logits = model(**model_inputs(model, batch.input_ids, batch.attention_mask)).logits
        return per_example_loss(logits, batch.labels)
    softcap = head[2]
    labels = shifted_labels(batch.labels)

    def token_losses(hidden, weight, bias):
        flat = linear_cross_entropy(
            hidden.flatten(0, 1).to(weight.dtype), weight, labels.flatten(), bias=bias, softcap=softcap
        )
        return flat.view(labels.shape)

    tokens = head_call(model, head, batch.input_ids, batch.attention_mask, token_losses)
    return tokens.sum(1) / (labels != IGNORE_INDEX).sum(1)


# ---------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------

OnLayer = Callable[[Layer, torch.Tensor, torch.Tensor, torch.Tensor], None]
KeepInput = Callable[[Layer, torch.Tensor, torch.Tensor], object]


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
    ``("head", module)``: the LM head, when it is the only captured layer (beside block layers
    the head does not move the start: it lies above every block); otherwise
    ``("embeddings", module)``: the input embeddings. Output gradients of the captured
    layers depend only on what lies above them, so cutting the graph at that module's
    input leaves every G unchanged and skips the backward through everything below.
    """
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers and out is not None and all(l.module is out for l in layers):
        return "head", out
    # The head lies above every block: beside block layers it does not move the start.
    layers = [l for l in layers if out is None or l.module is not out]
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

    def __init__(self, layers: list[Layer], on_layer: OnLayer, keep_input: KeepInput | None = None):
        self.layers = layers
        self.on_layer = on_layer
        self.keep_input = keep_input
        self.mask: torch.Tensor | None = None
        self.calls: dict[str, int] = {}
        self.received: set[str] = set()
        self._handles: list = []

    def __enter__(self) -> LayerHooks:
        token_wise = [l for l in self.layers if isinstance(l.module, SUPPORTED_TYPES)]
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in token_wise]
        self._handles += moe.register_hooks([l for l in self.layers if l not in token_wise], self)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.mask = None

    def arm(self, mask: torch.Tensor) -> None:
        self.mask, self.calls, self.received = mask, {}, set()

    def called(self, layer: Layer) -> None:
        """Count ``layer``'s forward call in the armed pass (one is allowed)."""
        self.calls[layer.name] = self.calls.get(layer.name, 0) + 1
        if self.calls[layer.name] > 1:
            raise RuntimeError(
                f"layer {layer.name} ran more than once in one forward pass; layers shared across "
                "positions of the network are not supported: exclude it (ProjectionConfig.exclude)"
            )

    def deliver(self, layer: Layer, A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor) -> None:
        """Hand ``layer``'s factors to ``on_layer`` (``mask``: the (n,) examples of a routed layer)."""
        self.received.add(layer.name)
        self.on_layer(layer, A, G, mask)

    def _forward_hook(self, layer: Layer):
        def hook(_module, inputs, output):
            mask = self.mask
            if mask is None:
                return
            self.called(layer)
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
            if self.keep_input is not None:  # held in the consumer's form until the backward, not the full A
                a = self.keep_input(layer, a, mask)

            def grad_hook(g):
                self.deliver(layer, a, g.detach().reshape(*mask.shape, g.shape[-1]), mask)

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


@dataclass
class Step:
    """One batch of a capture pass.

    ``batch``: validated, on the model's device; ``positions``: its examples' data positions
    (stream order for batches without ``positions``); ``closes``: it completes a window of
    batches (``fastinfluence.batching``), so the rows gathered since the last window can be put
    in data order and handed on; ``wanted``: how many of its examples this rank computes: those
    past ``skip_examples``, none of a shared batch another rank captures (0: nothing to compute).
    """

    batch: Batch
    positions: list[int]
    closes: bool
    wanted: int


class CapturePass:
    """The one way from a model and batches to each selected layer's (A, G, mask).

    Every stage that needs captured factors (extraction, exact scores, K-FAC fits and scores,
    the normaliser fit) goes through it, so they all select layers the same way, check batches
    against the model (vocabulary, positions, labels), run the forward under the same autocast,
    start the backward at the same place, and see the same data positions::

        capture = CapturePass(model, config)                  # selects layers, checks autocast
        for step in capture.batches(batches):                 # validated, with data positions
            losses = capture.backward(step.batch, on_layer)   # on_layer(layer, A, G, mask)

    ``A``: (B, T, d_in) layer input, ``G``: (B, T, d_out) output gradient of the sum over
    examples of each example's mean answer-token loss, both in the model's dtype (the autocast
    dtype for autocast forwards); ``mask``: (B, T) bool, True at attended tokens (padding rows
    of A and G must be ignored). ``dtype`` is the accumulation dtype of consumers: float64 for
    a float64 model, float32 otherwise. Routed layers (``layer.routed``: one expert of an MoE
    block, ``moe.ExpertLayer``) get their routed, attended tokens only: ``A``: (n, d_in),
    ``G``: (n, d_out), and in place of the mask ``example``: (n,) int64, each token's row in
    the batch (n = 0 for an expert no token reaches).

    Args:
        model: a causal LM; left as it was found after every call.
        config: selects the layers (``include`` / ``exclude`` / ``include_bias``) and
            ``autocast``; the ranks are the consumers' business.
        layers: already selected layers (overrides the config's selection).
    """

    def __init__(self, model: nn.Module, config: ProjectionConfig | None = None, layers: list[Layer] | None = None):
        check_causal_lm(model)
        self.model = model
        self.config = config or ProjectionConfig()
        self.layers = (
            layers
            if layers is not None
            else select_layers(model, self.config.include, self.config.exclude, self.config.include_bias)
        )
        weight_dtype = self.layers[0].weight.dtype
        if self.config.autocast is not None and weight_dtype != torch.float32:
            raise ValueError(
                f"ProjectionConfig(autocast={self.config.autocast!r}) needs a float32 model (autocast lowers float32 "
                f"matmuls), got {weight_dtype}; leave autocast=None"
            )
        self.device = model_device(model)
        if self.config.autocast == "float16" and self.device.type == "cpu":
            warnings.warn(
                "ProjectionConfig(autocast='float16') on a CPU: float16 matmuls are emulated there (about 10x slower "
                "than float32); use autocast='bfloat16' on a CPU",
                stacklevel=3,
            )
        self.autocast = self.config.autocast_dtype
        self.dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
        # Without a hook on the LM head, its logits need never exist: the loss comes from
        # the hidden states through the chunked linear cross-entropy.
        self.fused = fused_head(model)
        head_module = self.fused[1] if self.fused is not None else None
        self.head_layer = next((l for l in self.layers if l.module is head_module), None)
        self.head = self.fused if self.head_layer is None else None
        # A sharded model's forwards are collectives: ranks out of batches idle in step with the others.
        self.lockstep = dist.Lockstep(self._idle) if dist.is_distributed() and is_sharded(model) else None

    def batches(self, batches: Iterable[dict], skip_examples: int = 0, shared: bool = False) -> Iterator[Step]:
        """Validated batches with their data positions and windows (raises on an empty iterable,
        on positions that do not number the examples once each).

        ``shared``: every rank of a ``torch.distributed`` run passes the same batches and captures
        every ``world``-th of them (rank r the batches r, r + world, ...): the others are not
        ``wanted``; on a sharded model a rank then idles until every rank is done."""
        rank, world = dist.rank_world() if shared else (0, 1)
        tracker = WindowTracker()
        for i, batch in enumerate(iter_batches(batches, self.device, self.model)):
            n = batch.input_ids.shape[0]
            positions = batch.positions if batch.positions is not None else tracker.following(n)
            closes = tracker.add(n, positions)
            mine = i % world == rank
            yield Step(batch, positions, closes, sum(p >= skip_examples for p in positions) if mine else 0)
        tracker.finish()
        if shared:
            self.finish()

    def finish(self) -> None:
        """On a sharded model in a distributed run: idle in step with the ranks that still capture
        (``distributed.Lockstep``), until every rank has called it. Nothing otherwise."""
        if self.lockstep is not None:
            self.lockstep.finish()

    def backward(
        self,
        batch: Batch,
        on_layer: OnLayer,
        head_projection: torch.Tensor | None = None,
        head_grad: bool = False,
        keep_input: KeepInput | None = None,
    ) -> torch.Tensor:
        """One forward + backward on ``batch``, the hooks handing each layer's (A, G, mask) to
        ``on_layer`` as its G arrives; returns the (B,) per-example losses. The model is frozen
        (eval mode, no parameter gradient, graph started at ``backward_start``) for the call only.

        ``head_projection``: (V, k_out) P_out of a captured LM head. Given, the head's G reaches
        ``on_layer`` already projected, G P_out: (B, T, k_out), formed beside the loss over the
        vocabulary chunks of the labelled tokens (``ops.lm_head_grad``), never B x T x V; the
        blocks below get their gradients from the same chunks (no recompute); with the head the
        only captured layer no backward runs at all. Without it (or for a head the loss cannot be
        fused with, ``lm.fused_head``) the head is hooked like any layer and its G has the
        vocabulary's width. ``head_grad``: as with a projection, but the head's G reaches
        ``on_layer`` as an ``ops.lm_head_grad.HeadGrad``, G described (labels, loss weights, the
        head), for exact products over vocabulary chunks. ``keep_input(layer, A, mask)``: what a
        token-wise hooked layer holds from its forward until its G arrives, handed to ``on_layer``
        as its A (e.g. A already projected: the full input is then freed as the forward goes)."""
        projected = (
            (head_projection is not None or head_grad) and self.head_layer is not None and self.fused is not None
        )
        hooked = [l for l in self.layers if not (projected and l is self.head_layer)]
        if self.lockstep is not None:
            self.lockstep.step("backward" if hooked else "forward")
        mask = batch.attention_mask.bool()
        with frozen_for_capture(self.model, self.layers), LayerHooks(hooked, on_layer, keep_input) as hooks:
            hooks.arm(mask)
            # A captured head alone needs no backward: its features come from the forward.
            with torch.enable_grad() if hooked else torch.no_grad():
                with autocast_forward(self.device, self.autocast):
                    if projected:
                        losses, A, G = self._projected_head(batch, head_projection)
                    else:
                        losses = forward_losses(self.model, batch, self.head)
                if projected:
                    on_layer(self.head_layer, A, G, mask)
                if hooked:
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

    def _projected_head(self, batch: Batch, P_out: torch.Tensor | None):
        """(losses (B,), A = the head's input (B, T, H), G P_out (B, T, k_out)) of the captured head,
        G for the per-example mean loss (each token's G scaled by 1 / its example's answer tokens);
        without ``P_out``, G as a ``HeadGrad``. Inside the head's forward on a sharded model
        (``sharding.head_call``)."""
        softcap = self.fused[2]
        labels = shifted_labels(batch.labels)
        B, T = labels.shape
        side = {}

        def tokens_and_gp(hidden, weight, bias):
            P = P_out if P_out is not None else weight.new_zeros(weight.shape[0], 0)  # the loss and dh only
            tokens, side["GP"] = head_loss_projected(
                hidden.flatten(0, 1).to(weight.dtype), weight, labels.flatten(), P, bias=bias, softcap=softcap
            )
            side["A"], side["head"] = hidden.detach(), (weight.detach(), None if bias is None else bias.detach())
            return tokens.view(B, T)

        tokens = head_call(self.model, self.fused, batch.input_ids, batch.attention_mask, tokens_and_gp)
        answers = (labels != IGNORE_INDEX).sum(1)
        if P_out is None:
            G = HeadGrad(labels, 1.0 / answers.to(torch.float64), *side["head"], softcap, IGNORE_INDEX)
            return tokens.sum(1) / answers, side["A"], G
        GP = side["GP"].view(B, T, -1) / answers.to(side["GP"].dtype)[:, None, None]
        return tokens.sum(1) / answers, side["A"], GP

    def _idle(self, kind: str) -> None:
        """A step of ``kind`` on a two-token batch, results dropped: pairs a peer's collectives
        (``backward``: a forward and backward as ``backward`` runs them; ``forward``: a forward alone,
        what a captured head alone needs)."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        labels = torch.tensor([[IGNORE_INDEX, 0]], device=self.device)
        batch = Batch(ids, torch.ones_like(ids), labels, [None])
        lockstep, self.lockstep = self.lockstep, None  # an idle step announces nothing
        try:
            if kind == "backward":
                self.backward(batch, lambda *_: None)
            else:
                with torch.no_grad(), autocast_forward(self.device, self.autocast):
                    forward_losses(self.model, batch, self.fused)
        finally:
            self.lockstep = lockstep

    def run(
        self,
        batches: Iterable[dict],
        start: Callable[[Batch], OnLayer],
        desc: str | None = None,
        shared: bool = False,
        head_grad: bool = False,
    ) -> list[int]:
        """Capture every batch (``shared``: this rank's share, see ``batches``): ``start(batch)`` gives
        the batch's ``on_layer``; returns the stream row of each data position (``rows[order]`` puts
        per-batch rows back into data order). ``desc``: show a progress bar in examples under that name.
        ``head_grad``: as in ``backward``."""
        positions: list[int] = []
        with progress_bar(desc) as bar:
            for step in self.batches(batches, shared=shared):
                if step.wanted:
                    self.backward(step.batch, start(step.batch), head_grad=head_grad)
                    if bar is not None:
                        bar(step.wanted)
                positions.extend(step.positions)
        return sorted(range(len(positions)), key=positions.__getitem__)


class PairScorer:
    """What ``pairwise_scores`` asks of a scoring method (exact, K-FAC): keep the queries, then
    score each train batch against them, layer by layer as the capture hands them over.
    ``cosine``: squared gradient norms are wanted (the dot product skips them)."""

    # The captured LM head's G as an ``ops.lm_head_grad.HeadGrad`` (never B x T x V) when True.
    head_grad = False

    def __init__(self, cosine: bool):
        self.cosine = cosine

    def query(self, batch: Batch) -> OnLayer:
        """The ``on_layer`` that keeps what this query batch's layers need."""
        raise NotImplementedError

    def queries_done(self) -> torch.Tensor | None:
        """After the last query batch: (Q,) squared query norms (in stream order) when ``cosine``."""
        raise NotImplementedError

    def train(self, S: torch.Tensor, sq: torch.Tensor | None) -> OnLayer:
        """The ``on_layer`` that adds a train batch's scores to ``S`` (Q, B) and, for the cosine, its
        squared gradient norms to ``sq`` (B,)."""
        raise NotImplementedError


def pairwise_scores(
    capture: CapturePass,
    query_batches: Iterable[dict],
    train_batches: Iterable[dict],
    scorer: PairScorer,
    progress: bool = False,
) -> torch.Tensor:
    """(Q, N) scores of every train example on every query, summed over the captured layers, rows
    and columns in data order; divided by both gradient norms when ``scorer.cosine`` (an example
    whose gradient is zero scores 0).

    Query columns first (one pass, ``scorer.query``), then train columns (a second pass,
    ``scorer.train``) into one (Q, B) block per train batch; ``progress``: a bar per pass."""
    cosine = scorer.cosine
    head_grad = scorer.head_grad
    query_order = capture.run(query_batches, scorer.query, "queries" if progress else None, head_grad=head_grad)
    query_sq = scorer.queries_done()
    Q, dtype, device = len(query_order), capture.dtype, capture.device
    columns, train_sq = [], []

    def start(batch: Batch) -> OnLayer:
        B = batch.input_ids.shape[0]
        columns.append(torch.zeros(Q, B, dtype=dtype, device=device))
        train_sq.append(torch.zeros(B, dtype=dtype, device=device) if cosine else None)
        return scorer.train(columns[-1], train_sq[-1])

    train_order = capture.run(train_batches, start, "train" if progress else None, head_grad=head_grad)
    capture.finish()  # a sharded model's ranks may hold different numbers of batches
    scores = torch.cat(columns, dim=1)
    if cosine:
        inv = lambda x: torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), 0.0)  # noqa: E731
        scores = scores * inv(query_sq)[:, None] * inv(torch.cat(train_sq))[None, :]
    return scores[query_order][:, train_order]


@contextlib.contextmanager
def progress_bar(desc: str | None, total: int | None = None) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar counting examples under ``desc`` (its ``update``), or None without ``desc``."""
    if desc is None:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="ex") as bar:
        yield bar.update


def autocast_forward(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device`` (a no-op context for None): wraps forward passes only."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
