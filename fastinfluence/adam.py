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
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import Layer
from .ops._common import masked
from .sharding import whole

_CHUNK = 1 << 20  # numbers of dense per-example gradient transformed at once (4 MiB in float32)


def adam_layers(layers: list[Layer], optimizer, dense_limit: int) -> dict[str, tuple]:
    """Each layer's (weight, bias, weight stored transposed, parameter group), checked for the dense Adam path."""
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
        bias = layer.module.bias if layer.bias else None
        for p in (layer.weight, bias):
            if p is None:
                continue
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
        transposed = not isinstance(layer.module, nn.Linear)  # GPT-2 Conv1D stores W as (d_in, d_out)
        out[layer.name] = (layer.weight, bias, transposed, groups[id(layer.weight)])
    return out


def layer_moments(
    name: str, state: dict, weight: torch.Tensor, bias, transposed: bool, group: dict, dtype: torch.dtype
) -> tuple:
    """(exp_avg, exp_avg_sq, t, betas, eps) of one layer (an :func:`adam_layers` entry) as a
    (d_out, d_in + bias) gradient, read from the optimizer ``state``; t is the step being taken."""
    parts = [(weight, transposed)] + ([(bias, False)] if bias is not None else [])
    m, v, steps = [], [], set()
    for p, t in parts:
        st = state.get(p) or {}
        if "exp_avg" in st:  # a sharded model's are DTensors: gathered (every rank's backward reaches here)
            mp, vp = whole(st["exp_avg"].detach()), whole(st["exp_avg_sq"].detach())
            steps.add(int(st["step"]))
        else:  # no update yet: zero moments
            mp = vp = torch.zeros(p.shape, dtype=dtype, device=p.device)  # the whole shape of a DTensor
            steps.add(0)
        mp, vp = (mp.T, vp.T) if t else (mp, vp)
        mp, vp = (mp[:, None], vp[:, None]) if mp.dim() == 1 else (mp, vp)
        m.append(mp.to(dtype))
        v.append(vp.to(dtype))
    if len(steps) != 1:
        raise RuntimeError(f"layer {name}'s weight and bias are at different Adam steps {sorted(steps)}")
    m = m[0] if len(m) == 1 else torch.cat(m, 1)
    v = v[0] if len(v) == 1 else torch.cat(v, 1)
    return m, v, steps.pop() + 1, group["betas"], group["eps"]


def adam_rows(
    A: torch.Tensor,
    G: torch.Tensor,
    mask: torch.Tensor,
    bias: bool,
    scale: torch.Tensor,
    moments: tuple,
    P_in: torch.Tensor,
    P_out: torch.Tensor,
) -> torch.Tensor:
    """Projected Adam update directions of one layer, example by example.

    Args:
        A: (B, T, d_in) layer inputs; G: (B, T, d_out) captured output gradients; mask: (B, T) bool.
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
    A, G = masked(A.to(dtype), mask), masked(G.to(dtype), mask)
    if bias:
        A = torch.cat([A, mask.to(dtype)[..., None]], dim=-1)
    G = G * scale[:, None, None]
    B = A.shape[0]
    out = A.new_empty(B, P_out.shape[1] * P_in.shape[1])
    step = max(1, _CHUNK // exp_avg.numel())
    for i in range(0, B, step):
        g = G[i : i + step].transpose(1, 2) @ A[i : i + step]
        denom = torch.addcmul(v_base, g, g, value=(1 - b2) / bc2).sqrt_().add_(eps)
        gamma = torch.add(m_base, g, alpha=(1 - b1) / bc1).div_(denom)
        out[i : i + step] = (P_out.T @ gamma @ P_in).flatten(1)
    return out
