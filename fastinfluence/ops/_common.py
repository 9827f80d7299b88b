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
