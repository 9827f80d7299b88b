"""What the package knows about model architectures beyond the Linear layers it captures."""

from __future__ import annotations

import torch

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
