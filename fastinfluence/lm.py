"""Model plumbing shared by extraction and the unlearning losses.

How a causal LM is called so that an example's outputs do not depend on its padding,
and how its loss can be computed from the last hidden states and the LM head without
building B x T x V logits.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .batching import IGNORE_INDEX

# Config attributes of architectures that scale the logits after the LM head; those use the
# model's own logits.
_LOGIT_SCALING_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "dim_model_base", "output_multiplier")


def accepts(model: nn.Module, arg: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 positions: ``arange(T)`` minus the number of leading masked positions.

    Only left padding shifts the positions; a masked token inside the sequence (an eos used
    as pad inside a chat prompt, as in open-unlearning's ``attention_mask = input_ids != pad``)
    keeps its place, as in the model's own forward on the unpadded sequence. Counting the
    unmasked tokens instead (``cumsum(mask) - 1``) would move every later token. The leading
    pad positions get 0.
    """
    T = attention_mask.shape[-1]
    leading = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)
    return (torch.arange(T, device=attention_mask.device) - leading).clamp(min=0)


def model_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    """Forward arguments that make an example's outputs independent of its padding.

    Position ids are :func:`position_ids` of the attention mask, so that with left padding
    every example gets the positions it has alone (models with absolute position embeddings
    depend on it) and masked tokens inside a sequence do not move the later ones; no KV
    cache is built. Every forward of the package (capture, losses, evaluate) goes through here.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if attention_mask is not None and accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids(attention_mask)
    if accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


def fused_head(model) -> tuple[torch.nn.Module, torch.nn.Linear, float | None] | None:
    """(decoder, lm_head, softcap) when the loss can be computed from hidden states, else None.

    Needs a decoder distinct from the model whose last hidden state feeds a plain
    ``nn.Linear`` head (tied embeddings and a head bias are fine), and no logit scaling
    other than final-logit soft-capping.
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if decoder is None or decoder is model or type(head) is not torch.nn.Linear:
        return None
    if any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_SCALING_ATTRS):
        return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with the hidden states: position t holds labels[:, t+1]."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
