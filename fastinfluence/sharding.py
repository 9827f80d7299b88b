"""Models sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): weights are whole only inside a forward.

Outside its module's forward, a sharded parameter is a ``DTensor`` holding this rank's rows;
inside, FSDP2 has gathered it into a plain tensor. The capture hooks run inside the forward
and see whole layer inputs, output gradients and weights, so per-example features need no
communication. Two things read a weight elsewhere and are handled here:

- the fused LM-head loss (``ops.linear_cross_entropy`` on the last hidden states and the
  head's weight): :func:`head_call` runs it *inside* the head's forward, through the
  model's own forward, so it gets the weight FSDP2 gathered for the root module and the
  backward, the gradient reduction and the resharding follow FSDP2's own hooks;
- the model fingerprint: :func:`whole` gathers a captured weight, one layer at a time.

Each rank runs its own examples, but every forward of a sharded model is a collective (its
all-gathers pair with the other ranks'): the ranks must run the same number of forward and
backward passes. ``distributed.Lockstep`` keeps them paired when ranks hold different numbers of
batches: before each capture step a rank says so in a one-number all-reduce, and a rank that
has run out of batches runs an idle step (a two-token batch, its results dropped) for every
step a peer still takes, until every rank is done (``Lockstep.finish``, also run by
``distributed.barrier``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .lm import model_inputs

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    FSDPModule = DTensor = None


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel)."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def model_class(model: nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps it for a subclass named ``FSDP<name>``."""
    if FSDPModule is None or not isinstance(model, FSDPModule):
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (an all-gather: every rank calls it), ``t`` itself otherwise."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def head_call(
    model: nn.Module, head: tuple, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, fn: Callable
) -> torch.Tensor:
    """``fn(hidden, weight, bias)`` on the last hidden states and the LM head's whole weight.

    ``head``: ``lm.fused_head(model)`` = (decoder, lm_head, softcap); ``input_ids``,
    ``attention_mask``: (B, T), passed through ``lm.model_inputs``; ``fn(hidden (B, T, H),
    weight (V, H), bias (V,) or None)`` returns a (B, T, ...) tensor, e.g. per-token losses
    from ``ops.linear_cross_entropy``.

    Unsharded, the decoder runs and ``fn`` is called beside the head. Sharded (FSDP2), ``fn``
    runs *inside* the head's forward, through the model's own forward: the head's ``forward``
    is replaced by ``fn`` for the call, so the weight is the one FSDP2 gathered for the module
    that owns it, and FSDP2's backward hooks (on the model's output, which is ``fn``'s) gather,
    reduce and reshard as they do for the logits. The model's final-logit soft-capping is
    switched off for that call (``fn`` applies it: ``linear_cross_entropy(softcap=...)``).
    Memory: nothing beyond ``fn``'s own (no B x T x V logits); the head's weight is whole
    while the root module's parameters are, which FSDP2 keeps gathered from the root's
    forward to the end of the backward.
    """
    decoder, lm_head, _ = head
    if not is_sharded(model):
        hidden = decoder(**model_inputs(decoder, input_ids, attention_mask)).last_hidden_state
        return fn(hidden, lm_head.weight, lm_head.bias)
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    out: list[torch.Tensor] = []

    def forward(hidden):
        out.append(fn(hidden, lm_head.weight, lm_head.bias))
        # FSDP2 hooks the root's output for its backward: not a view (an in-place op would drop the hook)
        return out[-1] if out[-1]._base is None else out[-1].clone()

    saved = lm_head.__dict__.get("forward")  # an instance-level forward (a wrapper's) is put back
    lm_head.forward = forward
    try:
        if softcap is not None:
            config.final_logit_softcapping = None
        logits = model(**model_inputs(model, input_ids, attention_mask)).logits
    finally:
        if saved is None:
            del lm_head.forward
        else:
            lm_head.forward = saved
        if softcap is not None:
            config.final_logit_softcapping = softcap
    if len(out) != 1:
        raise RuntimeError(f"the LM head ran {len(out)} times in one forward of {type(model).__name__}; expected once")
    # The output carries FSDP2's backward hooks. A model that changes its logits' dtype (an
    # upcast) hands back other values: then fn's own, and FSDP2's final callback still runs.
    return logits if logits.dtype == out[0].dtype and logits.shape == out[0].shape else out[0]
