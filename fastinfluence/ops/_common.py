"""Small helpers shared by the op references."""

from __future__ import annotations

import torch


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (the accumulation dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_tokens(name: str, X: torch.Tensor, mask: torch.Tensor | None) -> None:
    if X.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, d), got {tuple(X.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(X.shape[:2]):
        raise ValueError(f"mask for {name} must have shape {tuple(X.shape[:2])}, got {tuple(mask.shape)}")


def masked(X: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of masked-out tokens. ``where`` (not a product) so NaN/inf in padding is dropped."""
    if mask is None or (mask.device.type == "cpu" and bool(mask.all())):
        return X  # nothing to drop (checked on the CPU only, where it costs no device sync)
    return torch.where(mask.bool().unsqueeze(-1), X, X.new_zeros(()))


def augmented(A: torch.Tensor, mask: torch.Tensor, bias: bool) -> torch.Tensor:
    """(B, T, d_in') masked layer inputs, with the bias column (1 at attended tokens) when ``bias``."""
    A = masked(A, mask)
    if bias:
        A = torch.cat([A, mask.unsqueeze(-1).to(A.dtype)], dim=-1)
    return A


# Per-example gradients formed at once, in elements (~128 MiB in float32), so that a batch of a
# wide layer is handled a few examples at a time.
GRADIENT_BUDGET = 1 << 25


def example_chunks(B: int, d_out: int, d_in: int):
    """Slices of a batch of B examples whose (d_out, d_in) per-example gradients fit ``GRADIENT_BUDGET``."""
    step = max(1, GRADIENT_BUDGET // max(d_out * d_in, 1))
    return (slice(s, min(s + step, B)) for s in range(0, B, step))
