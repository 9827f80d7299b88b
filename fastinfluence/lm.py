"""What the package knows about causal LMs: how one is called, and its architecture.

How a causal LM is called so that an example's outputs do not depend on its padding,
and how its loss can be computed from the last hidden states and the LM head without
building B x T x V logits; whether a model is a causal LM at all; its MLP blocks (SIMU's
neurons); the ``from_pretrained`` dtype keyword of the installed transformers.
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


def causal_lm_problem(architectures, model_type: str | None = None, saved: bool = True, where: str = "") -> str | None:
    """Why the transformers classes ``architectures`` are not a causal LM, as the end of a sentence
    ("... holds / is a BertForMaskedLM, not a causal LM: ..."), or None when one of them is, or when
    they are not all transformers classes (a model of the user's own is taken at its word).

    ``saved``: the classes are a saved directory's ``architectures`` (the hint then says what
    AutoModelForCausalLM would load instead), else a loaded model's class; ``where`` follows the
    class name (where it was read)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    names = [n for n in architectures if n]
    if not names or set(causal.values()) & set(names) or not all(hasattr(transformers, n) for n in names):
        return None
    loads = causal.get(model_type) if model_type else None
    if saved:
        why = f" (AutoModelForCausalLM would load it as {loads}, a head it was not trained with)" if loads else ""
    else:
        why = " (for its architecture: AutoModelForCausalLM, " + loads + ")" if loads else ""
    return (
        f"a {names[0]}{where}, not a causal LM{why}: fastinfluence needs a decoder-only language model "
        "(a ...ForCausalLM / ...LMHeadModel)"
    )


def check_causal_lm(model: nn.Module, what: str = "model") -> None:
    """Refuse a transformers model that is not a causal LM (a BertForMaskedLM, a bare LlamaModel) in
    one line, before any work; a PEFT model is judged by its base model."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    problem = causal_lm_problem(
        [type(base).__name__], getattr(getattr(base, "config", None), "model_type", None), False
    )
    if problem:
        raise ValueError(f"{what} is {problem}")


# (up-projection names, down-projection name) of the MLP blocks we know: Llama-style
# (gate/up/down), GPT-2 (c_fc/c_proj, Conv1D), and fc1/fc2 (OPT, Phi).
_MLP_KINDS = ((("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj"), (("fc1",), "fc2"))


def mlp_blocks(
    model: torch.nn.Module, required: bool = True
) -> dict[str, tuple[list[torch.nn.Module], torch.nn.Module]]:
    """MLP blocks by module name: ([up-projections], down-projection). The down-projection's
    input units are the neurons. The fused experts of MoE models hold parameters, not modules,
    under those names and are not MLP blocks here (``moe.experts_modules``). ``required``:
    raise when there is none."""
    blocks = {}
    for name, module in model.named_modules():
        for ups, down in _MLP_KINDS:
            if isinstance(getattr(module, down, None), torch.nn.Module) and any(
                isinstance(getattr(module, u, None), torch.nn.Module) for u in ups
            ):
                blocks[name] = ([getattr(module, u) for u in ups if hasattr(module, u)], getattr(module, down))
    if not blocks and required:
        raise ValueError(
            f"simu_mask: found no MLP block in {type(model).__name__} (looked for modules with "
            "gate_proj/up_proj + down_proj, c_fc + c_proj, or fc1 + fc2, and for fused MoE experts)"
        )
    return blocks


# transformers 4.56 renamed from_pretrained's torch_dtype to dtype; open-unlearning pins 4.45.1.
_DTYPE_SINCE = (4, 56)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` keyword for the load dtype in the installed transformers: ``dtype`` or ``torch_dtype``."""
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if version >= _DTYPE_SINCE else "torch_dtype": dtype}
