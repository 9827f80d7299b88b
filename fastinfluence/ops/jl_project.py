"""Dense Johnson-Lindenstrauss projection whose random matrix is never stored.

    out = x @ R[offset : offset + D] / sqrt(k)         x: (B, D) -> out: (B, k)

Entry (d, j) of R is +-1 (``rademacher``) or N(0, 1) (``gaussian``), a function of
(seed, kind, d, j) alone through the counter-based generator Philox4x32-10 (the exact
definition is in ``csrc/jl_entries.h``). The host twin, the CUDA kernel and the torch
reference here all compute the same float32 entries bit for bit, whatever the device,
thread count or batch size; the compiled kernels also share one summation order, so their
outputs agree bit for bit too. With the 1/sqrt(k) scale, E[<Px, Py>] = <x, y>.

``offset`` places x's first column at row ``offset`` of R, so a long vector can be
projected slice by slice: the sum over slices of ``jl_project(x[:, a:b], k, offset=a)``
equals ``jl_project(x, k)`` up to float rounding.
"""

from __future__ import annotations

import math

import torch

from ._backend import dispatch, register_op
from ._common import acc_dtype

KINDS = {"rademacher": 0, "gaussian": 1}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK32 = 0xFFFFFFFF
# Rows of R that one Philox call covers: 128 signs, or 4 Gaussians.
_BLOCK_SHIFT = {"rademacher": 7, "gaussian": 2}
# Entries the reference materialises at a time (64 MiB of float32).
_REFERENCE_ENTRIES = 1 << 24


def jl_scale(k: int) -> float:
    """1/sqrt(k) rounded to float32: the factor every implementation multiplies by last."""
    return float(torch.tensor(1.0 / math.sqrt(k), dtype=torch.float32))


# ----------------------------------------------------------------------------- Philox


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * m (a: int64 tensor of uint32 values) without overflowing int64."""
    p_lo, p_hi = a * (m & 0xFFFF), a * (m >> 16)  # each < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcast together)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


# ------------------------------------------------------- Box-Muller, rounded as in C++


def _f32(hex_value: str) -> torch.Tensor:
    return torch.tensor(float.fromhex(hex_value), dtype=torch.float32)


_C = {
    name: _f32(h)
    for name, h in {
        "sqrt2": "0x1.6a09e6p+0",
        "ln2": "0x1.62e430p-1",
        "half_pi": "0x1.921fb6p+0",
        "ln3": "0x1.555556p-2",
        "ln5": "0x1.99999ap-3",
        "ln7": "0x1.24924ap-3",
        "ln9": "0x1.c71c72p-4",
        "s3": "-0x1.555556p-3",
        "s5": "0x1.111112p-7",
        "s7": "-0x1.a01a02p-13",
        "s9": "0x1.71de3ap-19",
        "s11": "-0x1.ae6456p-26",
        "c2": "-0x1.0p-1",
        "c4": "0x1.555556p-5",
        "c6": "-0x1.6c16c2p-10",
        "c8": "0x1.a01a02p-16",
        "c10": "-0x1.27e4fcp-22",
        "c12": "0x1.1eed8ep-29",
        "one": "0x1.0p+0",
        "two": "0x1.0p+1",
        "minus_two": "-0x1.0p+1",
        "half": "0x1.0p-1",
        "two_m23": "0x1.0p-23",
        "two_m24": "0x1.0p-24",
    }.items()
}


def _log(u: torch.Tensor) -> torch.Tensor:
    """jl_log of csrc/jl_entries.h: ln u for float32 u in [2^-24, 1)."""
    c = _C
    bits = u.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)
    big = m > c["sqrt2"]
    m = torch.where(big, m * c["half"], m)
    e = e + big.to(torch.int64)
    s = (m - c["one"]) / (m + c["one"])
    s2 = s * s
    p = s2 * c["ln9"]
    p = s2 * (c["ln7"] + p)
    p = s2 * (c["ln5"] + p)
    p = c["ln3"] + p
    two_s = s * c["two"]
    return e.to(torch.float32) * c["ln2"] + (two_s + (two_s * s2) * p)


def _sincos(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """jl_sincos of csrc/jl_entries.h: (sin t, cos t) for t in (0, pi/2)."""
    c = _C
    t2 = t * t
    ps = t2 * c["s11"]
    for name in ("s9", "s7", "s5", "s3"):
        ps = t2 * (c[name] + ps)
    pc = t2 * c["c12"]
    for name in ("c10", "c8", "c6", "c4", "c2"):
        pc = t2 * (c[name] + pc)
    return t + t * ps, c["one"] + pc


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """jl_box_muller of csrc/jl_entries.h on int64 tensors of uint32 words."""
    u1 = (((a >> 9) << 1) | 1).to(torch.float32) * _C["two_m24"]
    # torch.sqrt of float32 is not always correctly rounded; the float64 root rounded to
    # float32 is (53 >= 2 * 24 + 2 bits), as sqrtf in C++ and CUDA.
    r = torch.sqrt((_log(u1) * _C["minus_two"]).double()).float()
    n = b >> 8
    f = (((n & 0x3FFFFF) << 1) | 1).to(torch.float32) * _C["two_m23"]
    s, c = _sincos(f * _C["half_pi"])
    q = n >> 22
    cq = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    sq = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    return r * cq, r * sq


def jl_entries(
    rows: int, k: int, seed: int = 0, kind: str = "rademacher", offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Rows ``offset .. offset + rows`` of the unscaled matrix R: (rows, k) float32 on ``device``.

    Vectorised torch integer and float32 operations that reproduce csrc/jl_entries.h bit
    for bit; memory is O(rows * k), so this is for tests and for the reference (which
    generates the entries where x lives, so no host-to-device copy of R is needed).
    """
    shift = _BLOCK_SHIFT[kind]
    d = offset + torch.arange(rows, dtype=torch.int64, device=device)
    first = offset >> shift
    nblocks = ((offset + rows - 1) >> shift) - first + 1
    block = (first + torch.arange(nblocks, dtype=torch.int64, device=device))[:, None]
    j = torch.arange(k, dtype=torch.int64, device=device)[None, :]
    counter = (block & _MASK32, j, torch.full_like(j, KINDS[kind]), block >> 32)
    words = philox4x32_10(counter, (seed & _MASK32, seed >> 32))
    local = (d >> shift) - first
    if kind == "rademacher":
        word = torch.stack(words)[(d >> 5) & 3, local]
        bit = (word >> (d & 31)[:, None]) & 1
        return (1 - 2 * bit).to(torch.float32)
    gauss = torch.stack([*_box_muller(words[0], words[1]), *_box_muller(words[2], words[3])])
    return gauss[d & 3, local]


# ------------------------------------------------------------------------------- op


def jl_project_reference(
    x: torch.Tensor, k: int, seed: int = 0, kind: str = "rademacher", offset: int = 0
) -> torch.Tensor:
    """Torch reference: R materialised block by block (O(k) rows of memory at a time)."""
    dtype = acc_dtype(x)
    B, D = x.shape
    out = torch.zeros(B, k, dtype=dtype, device=x.device)
    rows = max(1, _REFERENCE_ENTRIES // k)
    for d0 in range(0, D, rows):
        d1 = min(D, d0 + rows)
        R = jl_entries(d1 - d0, k, seed, kind, offset + d0, device=x.device).to(dtype)
        out += x[:, d0:d1].to(dtype) @ R
    scale = jl_scale(k) if dtype == torch.float32 else 1.0 / math.sqrt(k)
    return out * torch.tensor(scale, dtype=dtype, device=x.device)


register_op("jl_project", jl_project_reference)


def _check(x, k, seed, kind, offset):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"jl_project: x must be a (B, D) tensor, got {shape}; project one vector with x[None]")
    if x.dtype not in _DTYPES:
        raise TypeError(f"jl_project: x has dtype {x.dtype}; use float32, float16, bfloat16 or float64")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < 2**32:
        raise ValueError(f"jl_project: k must be an int in [1, 2^32), got {k!r}")
    if kind not in KINDS:
        raise ValueError(f"jl_project: kind must be one of {sorted(KINDS)}, got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"jl_project: seed must be an int in [0, 2^64), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + x.shape[1] >= 2**62:
        raise ValueError(f"jl_project: offset must be an int >= 0 with offset + D < 2^62, got {offset!r}")


def jl_project(x: torch.Tensor, k: int, seed: int = 0, kind: str = "rademacher", offset: int = 0) -> torch.Tensor:
    """Project the rows of x to k dimensions with an implicit random matrix.

    Args:
        x: (B, D) float32/float16/bfloat16/float64; e.g. flattened per-example gradients.
        k: output width, any int >= 1.
        seed: int in [0, 2^64); the matrix is a function of (seed, kind) only.
        kind: ``rademacher`` (entries +-1/sqrt(k)) or ``gaussian`` (N(0, 1/k)).
        offset: row of R that x's first column meets (for projecting a vector in slices).

    Returns:
        (B, k) float32 (float64 for float64 x; accumulation in that dtype), on x's device.
    """
    _check(x, k, seed, kind, offset)
    if x.numel() == 0:
        return torch.zeros(x.shape[0], k, dtype=acc_dtype(x), device=x.device)
    return dispatch("jl_project", x.device, x=x, k=k, seed=seed, kind=kind, offset=offset)
