"""Helpers shared by the Triton kernels.

Precision: the big products run on the tensor cores in the inputs' own dtype with float32
accumulation (bfloat16/float16 operands; float32 operands use TF32, rel. error ~3e-4).
Small products of float32 accumulators use 3xTF32 (``dot_f32``: about float32 accuracy,
on the tensor cores; IEEE float32 would run on the FMA units and spill registers).

Under ``TRITON_INTERPRET=1`` the interpreter multiplies bfloat16 operands as raw integers,
so ``dot`` upcasts them there; on a GPU they go to the tensor cores unchanged.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def dot(a, b, acc):
    """acc + a @ b with float32 accumulation; a (M, K), b (K, N) in one input dtype, M, N, K >= 16."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def dot_f32(a, b, acc):
    """acc + a @ b for float32 a, b at about float32 accuracy (3xTF32), for small products of accumulators."""
    return tl.dot(a, b, acc, input_precision="tf32x3")


def block(n: int, lo: int = 16, hi: int | None = None) -> int:
    """Power-of-two block covering ``n`` (at least ``lo`` so tl.dot dimensions stay >= 16)."""
    b = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(b, hi) if hi is not None else b


def mask_arg(mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A (B, T) mask as uint8 with its strides; ``like`` and (0, 0) stand in for no mask (never read)."""
    if mask is None:
        return like, (0, 0)
    mask = mask.to(torch.bool).view(torch.uint8)
    return mask, (mask.stride(0), mask.stride(1))


def num_programs_target(device: torch.device) -> int:
    """About two programs per streaming multiprocessor (a handful under the interpreter)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def token_splits(T: int, groups: int, device: torch.device, quantum: int) -> tuple[int, int]:
    """(splits, tokens_per_split) for ``groups`` independent sums over T tokens each.

    Ranges are multiples of ``quantum`` (the largest token block), and groups * splits
    reaches about ``num_programs_target`` so that a few long examples still fill the GPU.
    """
    T = max(T, 1)
    want = max(1, min(triton.cdiv(num_programs_target(device), max(groups, 1)), triton.cdiv(T, quantum)))
    per = triton.cdiv(triton.cdiv(T, want), quantum) * quantum
    return triton.cdiv(T, per), per


def autotune(gpu_configs: list[triton.Config], interpret_config: triton.Config, key: list[str], prune=None):
    """``triton.autotune`` over ``gpu_configs`` on a GPU; the one small config under the interpreter.

    ``prune(configs, named_args)`` drops configs that cannot serve the arguments.
    ``FASTINFLUENCE_TRITON_AUTOTUNE=0`` keeps only the first remaining config (quick tests).
    """
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key)
    first_only = os.environ.get("FASTINFLUENCE_TRITON_AUTOTUNE", "1") == "0"

    def early_prune(configs, named_args, **kwargs):
        configs = prune(configs, named_args, **kwargs) if prune else configs
        return configs[:1] if first_only else configs

    return triton.autotune(configs=gpu_configs, key=key, prune_configs_by={"early_config_prune": early_prune})
