"""LESS's Adam update directions (Xia et al. 2024): the projected Adam step of one example's gradient.

``InfluenceCallback(features=("adam",))`` calls it inside the Trainer's step, for the
rows of ``<output_dir>/adam/step-<last step>``: the projected
Adam update direction of each example's own gradient g_i (of L_i) at the step it was trained
(Xia et al. 2024, LESS), computed from the optimizer state Adam holds for that step::

    m = b1 m_prev + (1 - b1) g_i,   v = b2 v_prev + (1 - b2) g_i^2,   t = state step + 1
    Gamma_i = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),   row = P_out^T Gamma_i P_in

with (m_prev, v_prev) the ``exp_avg`` / ``exp_avg_sq`` of the layer's weight (and bias) before
the step's update and (b1, b2, eps) the parameter group's. This is torch's Adam/AdamW step
direction for a batch of one (no learning rate, no weight decay: decoupled decay does not
depend on the example; gradient clipping is not applied). LESS's released code omits the
bias correction and takes sqrt(v + eps); this follows the paper and torch.

The transform is elementwise on the full per-layer gradient, so it does not factorise through
the projection: each example's dense gradient G_i^T [A_i, 1] (d_out x (d_in + bias)) is formed,
transformed and then projected, one example at a time (d_out x d_in numbers in memory; B x T x
d_out x d_in multiply-adds a step, as many as the weight gradient of the step's own backward).
That is affordable for LoRA adapters and small layers (LESS itself uses LoRA); layers above
``dense_limit`` numbers are refused when training starts. Gamma is computed here, in the
training step, rather than from moments saved at checkpoints: the step's own backward has
each (A, G) and the optimizer holds the state, while a post-hoc pass would need a second
forward and backward over every training example at every checkpoint.

**MoE experts.** An expert layer (``moe.ExpertLayer``) is handled the same way: its per-example
gradient is the sum of g_t [a_t, 1]^T over the example's tokens routed to the expert, formed
from the routed (A, G) and each token's example (``ops.routed.segment_outer``, no (B, T)
grid), and its moments are expert e's slice of Adam's moments of the fused (E, ., .) parameter
and of its bias (``ExpertLayer.own``, as ``Normalizer.from_optimizer`` reads them). An example
none of whose tokens reaches the expert has g_i = 0 there, so its direction is Adam's step with
a zero gradient, the momentum's, as the formula gives. Routers are token-wise layers whose
weight is stored (E, H), a Linear's orientation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .capture import Layer, stored_transposed
from .moe import ExpertLayer
from .ops._common import masked
from .ops.routed import segment_outer
from .sharding import whole

_CHUNK = 1 << 20  # numbers of dense per-example gradient transformed at once (4 MiB in float32)

# (parameter, its share of the layer's gradient: a tensor shaped like the parameter -> (d_out, d_in) or (d_out,))
Part = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.T


def layer_parts(layer) -> list[Part]:
    """The parameters whose optimizer state makes up ``layer``'s (d_out, d_in + bias) gradient: its
    weight, then its bias when captured, each with the map from a tensor of the parameter's shape
    (its moments) to the layer's share of it."""
    if isinstance(layer, ExpertLayer):  # expert e's slice of the fused parameter and of its bias
        return [(layer.parameter, layer.own)] + ([(layer.bias_parameter, layer.own)] if layer.bias else [])
    own = _transposed if stored_transposed(layer.module) else _same
    return [(layer.weight, own)] + ([(layer.module.bias, _same)] if layer.bias else [])


def adam_layers(layers: list[Layer], optimizer, dense_limit: int) -> dict[str, tuple[list[Part], dict]]:
    """Each layer's (:func:`layer_parts`, parameter group), checked for the dense Adam path."""
    if optimizer is None:
        raise ValueError("InfluenceCallback(features=('adam',)) needs the Trainer's optimizer; none was passed")
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    groups = {id(p): g for g in inner.param_groups for p in g["params"]}
    out = {}
    for layer in layers:
        size = layer.d_out * (layer.d_in + int(layer.bias))
        if size > dense_limit:
            raise ValueError(
                f"layer {layer.name} is {layer.d_out} x {layer.d_in}: its Adam update direction needs each example's "
                f"dense gradient ({size} numbers, above dense_limit={dense_limit}). Train LoRA adapters (peft), "
                "capture smaller layers (ProjectionConfig(include=...)), or raise InfluenceCallback(dense_limit=...)"
            )
        parts = layer_parts(layer)
        for p, _ in parts:
            group = groups.get(id(p))
            if group is None:
                raise ValueError(
                    f"layer {layer.name}'s parameters are not in the optimizer: Adam directions exist only for "
                    "trained layers; choose trained layers with ProjectionConfig(include=...)"
                )
            if "betas" not in group or "eps" not in group or group.get("amsgrad"):
                raise ValueError(
                    f"InfluenceCallback's 'adam' features (LESS) need an Adam or AdamW optimizer (without amsgrad), "
                    f"got {type(inner).__name__}; train with optim='adamw_torch' or use features=('gradient',)"
                )
        out[layer.name] = (parts, groups[id(parts[0][0])])
    return out


def layer_moments(name: str, state: dict, parts: list[Part], group: dict, dtype: torch.dtype) -> tuple:
    """(exp_avg, exp_avg_sq, t, betas, eps) of one layer (an :func:`adam_layers` entry) as a
    (d_out, d_in + bias) gradient, read from the optimizer ``state``; t is the step being taken."""
    m, v, steps = [], [], set()
    for p, own in parts:
        st = state.get(p) or {}
        if "exp_avg" in st:  # a sharded model's are DTensors: gathered (every rank's backward reaches here)
            mp, vp = own(whole(st["exp_avg"].detach())), own(whole(st["exp_avg_sq"].detach()))
            steps.add(int(st["step"]))
        else:  # no update yet: zero moments
            shape = own(torch.empty(p.shape, device="meta")).shape  # the whole shape of a DTensor
            mp = vp = torch.zeros(shape, dtype=dtype, device=p.device)
            steps.add(0)
        mp, vp = (mp[:, None], vp[:, None]) if mp.dim() == 1 else (mp, vp)
        m.append(mp.to(dtype))
        v.append(vp.to(dtype))
    if len(steps) != 1:
        raise RuntimeError(f"layer {name}'s weight and bias are at different Adam steps {sorted(steps)}")
    m = m[0] if len(m) == 1 else torch.cat(m, 1)
    v = v[0] if len(v) == 1 else torch.cat(v, 1)
    return m, v, steps.pop() + 1, group["betas"], group["eps"]


def _token_gradients(A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, bias: bool, step: int):
    """(start, (c, d_out, d_in')) per-example gradients of a token-wise layer, ``step`` examples at a time.
    A: (B, T, d_in), G: (B, T, d_out) already scaled, mask: (B, T)."""
    A, G = masked(A, mask), masked(G, mask)
    if bias:
        A = torch.cat([A, mask.to(A.dtype)[..., None]], dim=-1)
    for i in range(0, A.shape[0], step):
        yield i, G[i : i + step].transpose(1, 2) @ A[i : i + step]


def _routed_gradients(A: torch.Tensor, G: torch.Tensor, example: torch.Tensor, B: int, bias: bool, step: int):
    """The same for a routed layer (an MoE expert): A (n, d_in), G (n, d_out) of the routed tokens,
    ``example`` (n,) each token's example; tokens sorted by example, each chunk's a contiguous run."""
    if bias:
        A = torch.cat([A, A.new_ones(A.shape[0], 1)], dim=1)
    if not bool((example[1:] >= example[:-1]).all()):
        example, order = torch.sort(example, stable=True)
        A, G = A[order], G[order]
    bounds = torch.searchsorted(example, torch.arange(0, B + step, step, device=example.device)).tolist()
    for k, i in enumerate(range(0, B, step)):
        s, t = bounds[k], bounds[k + 1]
        yield i, segment_outer(G[s:t], A[s:t], example[s:t] - i, min(step, B - i))


def adam_rows(
    A: torch.Tensor,
    G: torch.Tensor,
    mask: torch.Tensor,
    bias: bool,
    scale: torch.Tensor,
    moments: tuple,
    P_in: torch.Tensor,
    P_out: torch.Tensor,
    routed: bool = False,
) -> torch.Tensor:
    """Projected Adam update directions of one layer, example by example.

    Args:
        A: (B, T, d_in) layer inputs; G: (B, T, d_out) captured output gradients; mask: (B, T) bool.
            ``routed`` (an MoE expert): A (n, d_in), G (n, d_out) of its routed tokens and ``mask``
            (n,) int64, each token's example in [0, B).
        bias: whether the layer's bias is captured (a constant 1 appended to a).
        scale: (B,) turns example i's captured G into the gradient of L_i.
        moments: (exp_avg, exp_avg_sq, t, (b1, b2), eps), moments (d_out, d_in + bias) before step t.
        P_in: (d_in + bias, k_in); P_out: (d_out, k_out), in the accumulation dtype.

    Returns:
        (B, k_out * k_in): P_out^T Gamma_i P_in with Gamma_i = m_hat / (sqrt(v_hat) + eps) of g_i alone.

    A few examples at a time (``_CHUNK`` numbers of dense gradient), so that the dense gradients
    and the transform's temporaries stay in cache (twice as fast on the CPU as a large layer's
    whole batch at once) while small layers such as LoRA factors still take the batch in one go;
    the bias corrections are folded into the moments once per layer, leaving five passes.
    """
    dtype = P_in.dtype
    exp_avg, exp_avg_sq, t, (b1, b2), eps = moments
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    m_base, v_base = exp_avg * (b1 / bc1), exp_avg_sq * (b2 / bc2)
    B = scale.shape[0]
    step = max(1, _CHUNK // exp_avg.numel())
    A = A.to(dtype)
    if routed:
        G = G.to(dtype) * scale.to(dtype)[mask][:, None]
        grads = _routed_gradients(A, G, mask, B, bias, step)
    else:
        grads = _token_gradients(A, G.to(dtype) * scale.to(dtype)[:, None, None], mask, bias, step)
    out = A.new_empty(B, P_out.shape[1] * P_in.shape[1])
    for i, g in grads:
        denom = torch.addcmul(v_base, g, g, value=(1 - b2) / bc2).sqrt_().add_(eps)
        gamma = torch.add(m_base, g, alpha=(1 - b1) / bc1).div_(denom)
        out[i : i + len(g)] = (P_out.T @ gamma @ P_in).flatten(1)
    return out
