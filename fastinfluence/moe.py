"""Mixture-of-experts blocks of ``transformers`` 5.x as captured layers, and weight coverage.

An MoE block holds a router, a bare 2D ``weight`` (E, H) (gpt-oss adds a ``bias`` (E,)) used
with ``F.linear`` on every token, and an experts module with fused 3D parameters: per expert e,
``gate_up_proj[e]`` (2I, H) (or ``up_proj[e]`` for ungated experts) and ``down_proj[e]``
(H, I); stored transposed, (E, H, 2I) and (E, I, H), when the module's ``is_transposed`` is
set, with ``*_bias`` (E, d_out) beside them when ``has_bias`` is. Each token goes to its
top-k experts, whose outputs are scaled by the routing weights p_tk and summed.

Captured layers:

- the router is a token-wise Linear: ``Layer(name, router, H, E, bias)`` with (A, G, mask) as
  for any Linear; A is the input of its ``F.linear`` call and G the gradient of that call's
  output (the router logits), which reaches it through the routing weights;
- each (expert, fused parameter) is an ``ExpertLayer``, named like the module list the fused
  parameter stands for (``model.layers.3.mlp.experts.7.down_proj``). Its consumer receives the
  routed tokens only: ``on_layer(layer, A (n, d_in), G (n, d_out), example (n,))``, where
  ``example`` holds each token's row in the batch. G includes p_tk (it is the gradient of the
  expert's own output, before the routing weight scales it). Padding tokens are left out.

The experts' forward cannot be hooked per expert in any of the implementations
``transformers`` offers (an eager Python loop, ``batched_mm``, ``grouped_mm``), so while a
capture is armed the experts module runs ``routed_forward`` instead: the same math (the
module's own activation and gate, weights, biases and layout), on tokens sorted by expert
as ``grouped_mm`` sorts them, with one gradient hook per fused parameter. Kernels whose
math may differ (``deepgemm``, ``sonicmoe``, hub kernels) are refused with the implementation
to load instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

# Experts implementations whose math ``routed_forward`` reproduces.
CAPTURABLE = (None, "eager", "batched_mm", "grouped_mm")
# Expert layers and PEFT LoRA on the fused experts parameters (``experts.lora_A.default``, ...).
EXCLUDE_EXPERTS = r"\.experts\.(\d+|(base_layer\.)*lora_[AB])\."


def is_experts(module: nn.Module) -> bool:
    """A ``transformers`` experts module (``use_experts_implementation``) with fused 3D parameters."""
    down = getattr(module, "down_proj", None)
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
        and isinstance(down, nn.Parameter)
        and down.dim() == 3
        and isinstance(getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None), nn.Parameter)
    )


def _up_name(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


@dataclass(frozen=True)
class ExpertLayer:
    """One expert's slice of a fused parameter, captured as a Linear over the tokens routed to it.

    ``module``: the experts module; ``param``: ``gate_up_proj``, ``up_proj`` or ``down_proj``;
    ``expert``: e. ``weight`` is (d_out, d_in) whatever the storage; ``bias``: whether the bias
    gradient (``<param>_bias[e]``) is captured (a constant 1 appended to a).
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    bias: bool
    param: str
    expert: int
    routed: ClassVar[bool] = True
    tied: ClassVar[bool] = False  # an expert's weight is its own

    @property
    def parameter(self) -> nn.Parameter:
        """The fused (E, ., .) parameter this layer is one expert of."""
        return getattr(self.module, self.param)

    @property
    def bias_parameter(self) -> nn.Parameter | None:
        """The fused (E, d_out) bias beside the parameter (``<param>_bias``), None without one."""
        return getattr(self.module, self.param + "_bias", None)

    @property
    def weight(self) -> torch.Tensor:
        return self.own(self.parameter)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """Expert e's share of a tensor shaped like the fused parameter (E, ., .) or its bias (E, d_out),
        such as the optimizer's moments of them: (d_out, d_in) whatever the storage, or (d_out,)."""
        t = t[self.expert]
        return t.T if t.dim() == 2 and self.module.is_transposed else t


def expert_layers(name: str, experts: nn.Module, include_bias: bool) -> list[ExpertLayer]:
    """The (expert, fused parameter) layers of the experts module ``name``, expert by expert."""
    out = []
    for e in range(experts.down_proj.shape[0]):
        for param in (_up_name(experts), "down_proj"):
            rows, cols = getattr(experts, param).shape[1:]
            d_in, d_out = (rows, cols) if experts.is_transposed else (cols, rows)
            bias = include_bias and getattr(experts, param + "_bias", None) is not None
            out.append(ExpertLayer(f"{name}.{e}.{param}", experts, d_in, d_out, bias, param, e))
    return out


def routers(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(router module) -> (d_in, d_out) = (H, E) of every MoE block's router.

    A router is a sibling of an experts module that is not a Linear and holds a 2D ``weight``
    with one row per expert (``mlp.gate`` in Mixtral, Qwen-MoE, OLMoE, DeepSeek; ``mlp.router``
    in gpt-oss).
    """
    found = {}
    for parent in model.modules():
        experts = [m for m in parent.children() if is_experts(m)]
        for ex in experts:
            E = ex.down_proj.shape[0]
            for child in parent.children():
                w = getattr(child, "weight", None)
                if child is ex or isinstance(child, nn.Linear) or not isinstance(w, nn.Parameter):
                    continue
                if w.dim() == 2 and w.shape[0] == E:
                    found[id(child)] = (w.shape[1], E)
    return found


def check_implementation(name: str, experts: nn.Module) -> None:
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if impl not in CAPTURABLE:
        raise ValueError(
            f"{name} runs experts_implementation={impl!r}, whose kernels cannot be captured: call model."
            "set_experts_implementation('grouped_mm') (or load the model with experts_implementation='grouped_mm')"
        )


# ---------------------------------------------------------------------------------------
# The experts' math, routed tokens sorted by expert
# ---------------------------------------------------------------------------------------


def _grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: list[int], transposed: bool
) -> torch.Tensor:
    """(S, d_out): rows of group g (``counts[g]`` consecutive rows of x (S, d_in)) through expert g mod E."""
    E, pieces, start = weight.shape[0], [], 0
    for g, n in enumerate(counts):
        if n == 0:
            continue
        e, rows = g % E, x[start : start + n]
        y = rows @ weight[e] if transposed else F.linear(rows, weight[e])
        pieces.append(y if bias is None else y + bias[e])
        start += n
    return torch.cat(pieces)


# deliver(param, A (S, d_in), G (S, d_out)) for the parameters named in ``hooked``.
Deliver = Callable[[str, torch.Tensor, torch.Tensor], None]


def routed_forward(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    order: torch.Tensor,
    counts: list[int],
    hooked: set[str],
    deliver: Deliver,
) -> torch.Tensor:
    """The experts module's output (N, H) for tokens ``hidden`` (N, H) routed by ``top_k_index`` /
    ``top_k_weights`` (N, K), computed on the (token, slot) pairs in ``order`` (S = N K), grouped
    by ``counts`` (group g runs expert g mod E). For each fused parameter in ``hooked``, its
    input (S, d_in) and, in the backward, its output gradient (S, d_out), rows in ``order``, go
    to ``deliver``."""
    N, K = top_k_index.shape
    x = hidden[order // K]
    up_name, t = _up_name(experts), experts.is_transposed
    up = _grouped_linear(x, getattr(experts, up_name), getattr(experts, up_name + "_bias", None), counts, t)
    h = experts._apply_gate(up) if experts.has_gate else experts.act_fn(up)
    down = _grouped_linear(h, experts.down_proj, getattr(experts, "down_proj_bias", None), counts, t)
    for name, A, out in ((up_name, x, up), ("down_proj", h, down)):
        if name in hooked:
            A = A.detach()
            out.register_hook(lambda g, name=name, A=A: deliver(name, A, g.detach()))
    if getattr(experts, "has_post_expert_norm", False):
        down = experts.post_expert_norm(down)
    weighted = down * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(down.dtype)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    # Summed over the K slots like transformers' batched and grouped paths (same order as theirs).
    return weighted[inverse].view(N, K, -1).sum(dim=1).to(hidden.dtype)


def route(top_k_index: torch.Tensor, mask: torch.Tensor, E: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Sort the (token, slot) pairs by expert, attended tokens first.

    Returns ``order`` (S,) pair indices, ``counts`` (2E,): pairs per group, group e < E the
    attended tokens routed to expert e, group E + e the padding tokens routed to it (after every
    attended pair, so they are computed but never handed on), and ``example`` (n,): the batch row
    of each attended pair in ``order`` (n = the attended pairs). The sort is stable, so the pairs of
    one expert keep token order (each example's tokens stay together).
    """
    N, K = top_k_index.shape
    attended = mask.reshape(-1).repeat_interleave(K)
    key = top_k_index.reshape(-1) + E * (~attended).long()
    key, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=2 * E).tolist()
    n = sum(counts[:E])
    example = order[:n] // K // mask.shape[1]
    return order, counts, example


# ---------------------------------------------------------------------------------------
# Hooks (driven by capture.LayerHooks)
# ---------------------------------------------------------------------------------------


class _Forward:
    """``module.forward`` replaced by ``forward`` until ``remove()`` (restores what was there)."""

    def __init__(self, module: nn.Module, forward: Callable):
        self.module, self.saved = module, module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved


class _LinearCalls(TorchFunctionMode):
    """Records (input, output) of every ``F.linear`` whose weight has ``shape``."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape, self.calls = shape, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if weight.shape == self.shape:
                self.calls.append((args[0], out))
        return out


def hook_router(layer, hooks) -> _Forward:
    """Hand the router ``layer``'s (A, G, mask) to ``hooks`` when armed: A = the input of its
    ``F.linear`` call, G = the gradient of that call's output."""
    module = layer.module
    original = module.forward

    def forward(*args, **kwargs):
        mask = hooks.mask
        if mask is None:
            return original(*args, **kwargs)
        hooks.called(layer)
        with _LinearCalls(module.weight.shape) as seen:
            out = original(*args, **kwargs)
        if len(seen.calls) != 1:
            raise RuntimeError(
                f"router {layer.name} made {len(seen.calls)} F.linear calls with its weight, expected one; exclude it"
            )
        x, logits = seen.calls[0]
        if x.shape[:-1].numel() != mask.numel():
            raise RuntimeError(f"router {layer.name} saw {tuple(x.shape)} inputs for (B, T) = {tuple(mask.shape)}")
        a = x.detach().reshape(*mask.shape, layer.d_in)
        logits.register_hook(lambda g: hooks.deliver(layer, a, g.detach().reshape(*mask.shape, layer.d_out), mask))
        return out

    return _Forward(module, forward)


_TOKENS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastinfluence_routed_tokens", default=None)


@contextlib.contextmanager
def routed_tokens() -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each armed forward of an experts module records, per selected expert
    layer, the token of each row it will hand on: ``{layer name: (n,) int64 index into the
    flattened (B, T) tokens}``, rows in the order ``on_layer`` receives them (the forward runs
    before the backward that delivers them; a layer's entry is replaced by each forward)."""
    found: dict[str, torch.Tensor] = {}
    token = _TOKENS.set(found)
    try:
        yield found
    finally:
        _TOKENS.reset(token)


def hook_experts(name: str, layers: list[ExpertLayer], hooks) -> _Forward:
    """Run the experts module ``name`` through ``routed_forward`` when armed, handing each selected
    expert layer's routed (A, G, example) to ``hooks`` (every selected layer, with n = 0 rows for
    an expert no attended token reaches)."""
    experts = layers[0].module
    check_implementation(name, experts)
    E = experts.down_proj.shape[0]
    by_param: dict[str, dict[int, ExpertLayer]] = {}
    lora: dict[str, list[ExpertLoraLayer]] = {}
    for l in layers:
        if isinstance(l, ExpertLoraLayer):
            lora.setdefault(l.param, []).append(l)
        else:
            by_param.setdefault(l.param, {})[l.expert] = l
    original = experts.forward

    def forward(hidden, top_k_index, top_k_weights, *args, **kwargs):
        mask = hooks.mask
        if mask is None:
            return original(hidden, top_k_index, top_k_weights, *args, **kwargs)
        for l in layers:
            hooks.called(l)
        if hidden.shape[0] != mask.numel():
            raise RuntimeError(f"{name} saw {hidden.shape[0]} tokens for (B, T) = {tuple(mask.shape)}")
        order, counts, example = route(top_k_index, mask, E)
        n, bounds = len(example), [0]
        for c in counts[:E]:
            bounds.append(bounds[-1] + c)
        record = _TOKENS.get()
        if record is not None:  # each row's token: its (token, slot) pair's token
            token = order[:n] // top_k_index.shape[1]
            record.update({l.name: token[bounds[e] : bounds[e + 1]] for p in by_param.values() for e, l in p.items()})
            record.update({l.name: token for ls in lora.values() for l in ls})

        def deliver(param: str, A: torch.Tensor, G: torch.Tensor) -> None:
            A, G = A[:n], G[:n]
            for e, layer in by_param.get(param, {}).items():
                s, t = bounds[e], bounds[e + 1]
                hooks.deliver(layer, A[s:t], G[s:t], example[s:t])
            if param in lora:
                expert = torch.repeat_interleave(
                    torch.arange(E, device=A.device), torch.tensor(counts[:E], device=A.device)
                )
                for layer in lora[param]:
                    hooks.deliver(layer, *layer.factors(A, G, expert), example)

        hooked = set(by_param) | set(lora)
        return routed_forward(experts, hidden, top_k_index, top_k_weights, order, counts, hooked, deliver)

    return _Forward(experts, forward)


def register_hooks(layers: list, hooks) -> list[_Forward]:
    """Hooks for the routers and expert layers among ``layers``; ``hooks`` (``capture.LayerHooks``)
    gives ``mask``, ``called(layer)`` and ``deliver(layer, A, G, mask_or_example)``."""
    handles, groups = [], {}
    for l in layers:
        if l.routed:
            groups.setdefault(id(l.module), []).append(l)
        else:
            handles.append(hook_router(l, hooks))
    for group in groups.values():
        name = group[0].name.rsplit(".", 2)[0] if isinstance(group[0], ExpertLayer) else group[0].name
        handles.append(hook_experts(name, group, hooks))
    return handles


# ---------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """Trainable weight matrices (elements) of a model and how many of them ``layers`` capture.

    Weight matrices: parameters with two or more dimensions, not biases (names ending in
    ``bias``), not embeddings, not shared by several modules (a tied head); the trainable ones,
    or every one when none is trainable. ``missing``: names of those not wholly captured.
    """

    captured: int
    total: int
    missing: list[str]

    @property
    def fraction(self) -> float:
        return self.captured / self.total if self.total else 1.0


def weight_matrices(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = {
        id(p): (n, p)
        for n, p in model.named_parameters()
        if p.dim() >= 2 and not n.endswith("bias") and id(p) not in embedded and owners[id(p)] == 1
    }
    trainable = {k: v for k, v in found.items() if v[1].requires_grad}
    return trainable or found


def coverage(model: nn.Module, layers: list) -> Coverage:
    matrices = weight_matrices(model)
    covered: dict[int, int] = {}
    for l in layers:
        p = l.parameter if l.routed else l.module.weight
        covered[id(p)] = covered.get(id(p), 0) + l.d_in * l.d_out
    captured = sum(min(covered.get(k, 0), p.numel()) for k, (_, p) in matrices.items())
    missing = [n for k, (n, p) in matrices.items() if covered.get(k, 0) < p.numel()]
    return Coverage(captured, sum(p.numel() for _, p in matrices.values()), missing)


_WARNED: weakref.WeakSet = weakref.WeakSet()


def warn_uncapturable(model: nn.Module, capturable: list) -> None:
    """Warn once per model when some of its trainable weight matrices no supported layer captures."""
    missing = coverage(model, capturable).missing
    if missing and model not in _WARNED:
        _WARNED.add(model)
        warnings.warn(
            f"{len(missing)} trainable weight matrices of {type(model).__name__} are in no layer fastinfluence can "
            f"capture (an unsupported module or fused parameter), so no feature or score covers them: "
            f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}",
            stacklevel=4,
        )


# ---------------------------------------------------------------------------------------
# Neurons of experts (SIMU)
# ---------------------------------------------------------------------------------------


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if is_experts(m)}


def neuron_units(experts: nn.Module) -> torch.Tensor:
    """(I, d_up) bool: which outputs of the up-projection feed each neuron (intermediate unit).

    Ungated experts: the identity. Gated experts: read off the module's own gate function
    (``_apply_gate``) by its Jacobian at a point where every unit matters, so the layout
    (halves as in Mixtral, interleaved as in gpt-oss) is the one the module computes with.
    """
    up = getattr(experts, _up_name(experts))
    d_up = up.shape[2 if experts.is_transposed else 1]
    I = experts.down_proj.shape[1 if experts.is_transposed else 2]
    if not experts.has_gate:
        return torch.eye(I, dtype=torch.bool)
    x = torch.linspace(0.3, 0.9, d_up, dtype=torch.float64)[None]
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(lambda v: experts._apply_gate(v)[0], x)[:, 0]
    units = jac != 0
    if units.shape != (I, d_up) or (units.sum(0) != 1).any():
        raise ValueError(
            f"the gate of {type(experts).__name__} does not map each of its {d_up} up-projection units to one of its "
            f"{I} neurons; SIMU masks cannot be laid onto it"
        )
    return units


def expert_neuron_keep(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Gradient keep-masks of the fused parameters for SIMU masks on experts.

    ``masks``: {``<experts module>.<e>``: (I,) bool}; every other key is ignored. Returns
    {id(parameter): bool tensor broadcastable to it}: for each experts module named, the up
    projection's units of the selected neurons (and their bias entries) and the down
    projection's columns of them, of the named experts only. Raises on a wrong size or expert.
    """
    modules = experts_modules(model)
    keep: dict[int, torch.Tensor] = {}
    for key, mask in masks.items():
        name, _, e = key.rpartition(".")
        experts = modules.get(name)
        if experts is None or not e.isdigit():
            continue
        e, mask = int(e), torch.as_tensor(mask, dtype=torch.bool).flatten()
        E, t = experts.down_proj.shape[0], experts.is_transposed
        units = neuron_units(experts)
        if e >= E or mask.numel() != units.shape[0]:
            raise ValueError(
                f"simu_masks[{key!r}]: {name} has {E} experts of {units.shape[0]} neurons each, got expert {e} with "
                f"{mask.numel()} neurons"
            )
        up_name = _up_name(experts)
        up_units = (units & mask[:, None]).any(0)
        # (parameter, unit mask, dim of the unit axis in one expert's slice)
        parts = [(getattr(experts, up_name), up_units, 1 if t else 0), (experts.down_proj, mask, 0 if t else 1)]
        bias = getattr(experts, up_name + "_bias", None)
        if bias is not None:
            parts.append((bias, up_units, 0))
        for p, unit_mask, dim in parts:
            k = keep.setdefault(id(p), torch.zeros(p.shape, dtype=torch.bool))
            view = [1] * (p.dim() - 1)
            view[dim] = -1
            k[e] |= unit_mask.view(view).expand(p.shape[1:])
    return keep


def expert_neuron_attribution(model: nn.Module):
    """A context manager that, while a loss is back-propagated through ``model``, sums per
    expert |a_tj * dL/da_tj| over the tokens routed to it (a: the down projection's input);
    ``totals`` maps ``<experts module>.<e>`` to an (I,) float64 sum."""
    return _NeuronAttribution(model)


class _NeuronAttribution:
    def __init__(self, model: nn.Module):
        self.modules = experts_modules(model)
        self.totals: dict[str, torch.Tensor] = {}
        self._handles: list[_Forward] = []

    def __enter__(self) -> _NeuronAttribution:
        for name, experts in self.modules.items():
            check_implementation(name, experts)
            E, I = experts.down_proj.shape[0], experts.down_proj.shape[1 if experts.is_transposed else 2]
            for e in range(E):
                self.totals[f"{name}.{e}"] = torch.zeros(I, dtype=torch.float64)
            self._handles.append(_Forward(experts, self._forward(name, experts)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward(self, name: str, experts: nn.Module):
        E = experts.down_proj.shape[0]

        def forward(hidden, top_k_index, top_k_weights, *args, **kwargs):
            every = torch.ones(top_k_index.shape[0], 1, dtype=torch.bool, device=hidden.device)
            order, counts, _ = route(top_k_index, every, E)

            def deliver(param: str, A: torch.Tensor, G: torch.Tensor) -> None:
                W = experts.down_proj.detach()
                start = 0
                for e, n in enumerate(counts[:E]):
                    if n:
                        w = W[e].T if experts.is_transposed else W[e]  # (H, I)
                        a, g = A[start : start + n], G[start : start + n]
                        total = self.totals[f"{name}.{e}"]
                        total += (a * (g @ w.to(g.dtype))).abs().sum(0).to(total.device, torch.float64)
                    start += n

            return routed_forward(experts, hidden, top_k_index, top_k_weights, order, counts, {"down_proj"}, deliver)

        return forward


# ---------------------------------------------------------------------------------------
# LoRA on fused parameters (PEFT ``target_parameters``)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertLoraLayer:
    """The ``lora_A`` or ``lora_B`` weight of a PEFT LoRA on a fused experts parameter
    (``LoraConfig(target_parameters=[...])``), captured from the routed tokens of every expert.

    PEFT's ``ParamWrapper`` adds s B_e A_e (the Linear orientation (d_out, d_in), whatever the
    storage) to expert e's slice inside the experts' forward, with A_e = ``lora_A.weight``
    viewed (E, r, d_in) and B_e = ``lora_B.weight`` viewed (d_out, r, E)[:, :, e]. Its Linear
    modules never run, so the hooks of the experts module deliver their factors: for a token t
    routed to e with input a_t and output gradient g_t, ``lora_A`` gets (a_t, s B_e^T g_t in
    block e of E r) and ``lora_B`` gets (s A_e a_t in entries j E + e of r E, g_t).
    """

    name: str
    module: nn.Module  # the experts module (as for ExpertLayer: one hook per experts module)
    d_in: int
    d_out: int
    bias: bool
    param: str  # the fused parameter the adapter is on
    kind: str  # "A" or "B"
    wrapper: nn.Module  # the ParamWrapper
    adapter: str
    routed: ClassVar[bool] = True
    tied: ClassVar[bool] = False

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.wrapper, f"lora_{self.kind}")[self.adapter].weight

    @property
    def parameter(self) -> nn.Parameter:
        return self.weight

    def factors(self, A: torch.Tensor, G: torch.Tensor, expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', G') of this adapter weight from the fused parameter's routed (A (n, d_in), G (n, d_out)),
        ``expert`` (n,) each token's expert."""
        E, s = self.wrapper.num_experts, self.wrapper.scaling[self.adapter]
        lora_A = self.wrapper.lora_A[self.adapter].weight.detach()
        lora_B = self.wrapper.lora_B[self.adapter].weight.detach()
        r = lora_A.shape[0] // E
        a_mat = lora_A.reshape(E, r, -1).to(A.dtype)  # (E, r, d_in)
        b_mat = lora_B.reshape(lora_B.shape[0], r, E).permute(2, 0, 1).to(G.dtype)  # (E, d_out, r)
        n = len(expert)
        if self.kind == "A":  # lora_A (E r, d_in): rows e r .. e r + r
            low = s * torch.einsum("nd,ndr->nr", G, b_mat[expert]) if n else G.new_zeros(0, r)
            Gp = G.new_zeros(n, E, r)
            Gp[torch.arange(n, device=G.device), expert] = low
            return A, Gp.reshape(n, E * r)
        low = s * torch.einsum("nrd,nd->nr", a_mat[expert], A) if n else A.new_zeros(0, r)  # lora_B: columns j E + e
        Ap = A.new_zeros(n, r, E)
        Ap[torch.arange(n, device=A.device), :, expert] = low
        return Ap.reshape(n, r * E), G


def _param_wrappers(model: nn.Module) -> dict[int, tuple[str, nn.Module, nn.Module]]:
    """id(lora Linear module) -> (name prefix, ParamWrapper, experts module) for PEFT LoRA on fused experts."""
    out = {}
    for n, m in model.named_modules():
        if type(m).__name__ != "ParamWrapper":
            continue
        experts = m
        while type(experts).__name__ == "ParamWrapper":
            experts = experts.base_layer
        if not is_experts(experts):
            continue
        for kind in ("A", "B"):
            for adapter, linear in getattr(m, f"lora_{kind}").items():
                out[id(linear)] = (f"{n}.lora_{kind}.{adapter}", m, experts)
    return out


def lora_expert_layers(model: nn.Module) -> dict[int, ExpertLoraLayer]:
    """id(lora Linear module) -> its ExpertLoraLayer, for every PEFT LoRA on a fused experts parameter."""
    out = {}
    for key, (name, wrapper, experts) in _param_wrappers(model).items():
        kind, adapter = name.rsplit(".", 2)[-2][-1], name.rsplit(".", 1)[-1]
        if wrapper.parameter_name not in (_up_name(experts), "down_proj") or wrapper.num_experts != len(
            experts.down_proj
        ):
            continue
        w = getattr(wrapper, f"lora_{kind}")[adapter].weight
        out[key] = ExpertLoraLayer(
            name, experts, w.shape[1], w.shape[0], False, wrapper.parameter_name, kind, wrapper, adapter
        )
    return out


def refuse_lora_on_experts(model: nn.Module, layers: list) -> None:
    """One-line error when ``layers`` hold a LoRA module of a PEFT ``ParamWrapper`` that is not one
    of the supported fused experts parameters (its Linear modules never run, so no hook sees them)."""
    wrappers = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
    if not wrappers:
        return
    inside = [l.name for l in layers if not l.routed and any(l.name.startswith(w + ".") for w in wrappers)]
    if inside:
        raise ValueError(
            f"LoRA on parameters (PEFT target_parameters: {', '.join(inside[:2])}, ... {len(inside)} in all) "
            f"is captured on the fused experts' gate_up_proj / up_proj / down_proj only: exclude these with "
            f"ProjectionConfig(exclude=[...])"
        )
