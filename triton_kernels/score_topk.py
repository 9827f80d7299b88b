"""Query x train-chunk scores with the scales, the top-k keys and the per-row aggregates fused.

One program per (block of train rows, block of queries) computes its (BQ, BN) score tile
in float32, applies ``query_scale`` and ``train_scale`` in the epilogue, reduces the tile
over its queries into partial (sum, sum of squares, max) per train row, and writes one
int64 sort key per score instead of the score itself:

    key = ordered_bits(score) * 2^32 + (2^32 - 1 - train_index)

Keys order by value first and, for equal values, put the lower train index first, so a
plain ``torch.topk`` over the keys of ``prev`` and of the chunk is the exact merged top-k
with the reference's tie order, with no sort. Values and indices decode from the keys.
float64 inputs, or query and train of different dtypes, run on the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinfluence.ops.score_topk import TopK

from ._common import INTERPRET, KERNEL_DTYPES, autotune, block, dot

_LOW = 2**32 - 1  # train indices live in the low 32 bits of a key

# (BQ, BN, BD, warps, stages). BQ follows Q (_query_block); the configs of that BQ are tuned.
# Per BQ the first config (the one FASTINFLUENCE_TRITON_AUTOTUNE=0 runs) fits sm_90's shared
# memory in every dtype once ``config_fits`` has pruned, and none spills registers under
# triton 3.6 or 3.9 except the two 128 x 128 tiles (4 bytes under 3.6), kept for large Q.
_GPU_CONFIGS = [
    triton.Config({"BQ": bq, "BN": bn, "BD": bd}, num_warps=w, num_stages=st)
    for bq, bn, bd, w, st in [
        (16, 128, 128, 4, 4),
        (16, 256, 64, 4, 4),
        (16, 64, 128, 4, 4),
        (32, 128, 128, 4, 4),
        (32, 256, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (64, 128, 128, 8, 3),
        (64, 64, 128, 4, 3),
        (128, 64, 128, 4, 4),
        (128, 64, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
    ]
]
_INTERPRET_CONFIG = triton.Config({"BQ": 16, "BN": 16, "BD": 16})
SM90_SHARED_BYTES = 232448  # opt-in shared memory per block of an sm_90 GPU


def shared_bytes_bound(config: triton.Config, element_size: int) -> int:
    """Upper bound of the kernel's shared memory: one (BQ + BN) x BD tile of inputs per pipeline stage.

    Triton keeps num_stages - 1 or num_stages such tiles and nothing else (checked for every
    config by ``compile_check``); float32 inputs need twice the bytes of bfloat16 ones.
    """
    kw = config.kwargs
    return config.num_stages * (kw["BQ"] + kw["BN"]) * kw["BD"] * element_size


def config_fits(config: triton.Config, element_size: int, limit: int = SM90_SHARED_BYTES) -> bool:
    return shared_bytes_bound(config, element_size) <= limit


def _shared_limit(device: torch.device) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"])
    except Exception:  # a driver without the query: assume sm_90's limit
        return SM90_SHARED_BYTES


def _query_block(Q: int) -> int:
    """Queries per program: all of them up to 128 (each train tile is then read once)."""
    return 16 if INTERPRET.value else block(Q, hi=128)


def _configs_for_q(configs, named_args, **kwargs):
    """Configs of Q's query block whose inputs fit the device's shared memory in their dtype
    (the smallest one when none does), in their listed order."""
    configs = [c for c in configs if c.kwargs["BQ"] == _query_block(named_args["Q"])]
    train = named_args["Xf"]
    limit, size = _shared_limit(train.device), train.element_size()
    fitting = [c for c in configs if config_fits(c, size, limit)]
    return fitting or [min(configs, key=lambda c: shared_bytes_bound(c, size))]


@autotune(_GPU_CONFIGS, _INTERPRET_CONFIG, key=["Q", "D"], prune=_configs_for_q)
@triton.jit
def _score_kernel(
    Qf,
    Xf,
    QS,
    XS,
    Keys,
    Agg,
    Q,
    n,
    D,
    index_offset,
    s_qq,
    s_qd,
    s_xn,
    s_xd,
    s_kq,
    s_kn,
    s_at,
    s_ar,
    s_an,
    HAS_QS: tl.constexpr,
    HAS_XS: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_q = tl.program_id(1)
    rq = pid_q * BQ + tl.arange(0, BQ)
    rn = pid_n * BN + tl.arange(0, BN)
    q_ok = rq < Q
    n_ok = rn < n
    q_off = rq.to(tl.int64) * s_qq
    x_off = rn.to(tl.int64) * s_xn
    dd = tl.arange(0, BD)
    s = tl.zeros((BQ, BN), tl.float32)
    for d0 in range(0, D, BD):
        d_ok = (d0 + dd) < D
        q = tl.load(Qf + q_off[:, None] + (d0 + dd)[None, :] * s_qd, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        x = tl.load(Xf + x_off[:, None] + (d0 + dd)[None, :] * s_xd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = dot(q, tl.trans(x), s)
    if HAS_QS:
        s *= tl.load(QS + rq, mask=q_ok, other=0.0)[:, None]
    if HAS_XS:
        s *= tl.load(XS + rn, mask=n_ok, other=0.0)[None, :]
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 and +0.0 are one value: give them one key

    ok = q_ok[:, None] & n_ok[None, :]
    agg = Agg + pid_q * s_at + rn * s_an
    tl.store(agg, tl.sum(tl.where(ok, s, 0.0), axis=0), mask=n_ok)
    tl.store(agg + s_ar, tl.sum(tl.where(ok, s * s, 0.0), axis=0), mask=n_ok)
    tl.store(agg + 2 * s_ar, tl.max(tl.where(ok, s, float("-inf")), axis=0), mask=n_ok)

    # The key's two 32-bit words are stored separately (little-endian int64): the high word
    # holds the ordered score bits, the low word depends on the column only.
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    low = (4294967295 - (rn.to(tl.int64) + index_offset)).to(tl.int32)
    key = Keys + rq.to(tl.int64)[:, None] * s_kq + rn.to(tl.int64)[None, :] * s_kn
    tl.store(key + 1, ordered, mask=ok)
    tl.store(key, tl.broadcast_to(low[None, :], (BQ, BN)), mask=ok)


def encode_keys(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 ``values`` and int64 ``indices`` (< 2^32), ordered as the kernel's."""
    bits = torch.where(values == 0, torch.zeros_like(values), values).view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return ordered * 2**32 + (_LOW - indices)


def decode_keys(keys: torch.Tensor) -> TopK:
    """TopK(values float32, indices int64) from keys."""
    ordered = (keys >> 32).to(torch.int32)
    values = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).view(torch.float32)
    return TopK(values, _LOW - (keys & _LOW))


def supports_score_topk(query, train, **_) -> bool | str:
    if query.dtype != train.dtype or query.dtype not in KERNEL_DTYPES:
        return f"query {query.dtype} and train {train.dtype} (one float32/float16/bfloat16 dtype needed)"
    if query.shape[0] == 0 or train.shape[0] == 0:
        return "no query or no train rows"
    return True


def score_topk(query, train, k, query_scale=None, train_scale=None, index_offset=0, prev=None):
    """(TopK (Q, k'), aggregates (3, n) float32); see ``fastinfluence.ops.score_topk``."""
    Q, D = query.shape
    n = train.shape[0]
    if index_offset < 0 or index_offset + n > _LOW:
        raise ValueError(
            f"score_topk: train rows {index_offset}..{index_offset + n} must lie in [0, 2^32) for the Triton kernel"
        )
    BQ = _query_block(Q)
    keys = torch.empty(Q, n, device=query.device, dtype=torch.int64)
    words = keys.view(torch.int32)  # (Q, 2n): low and high word of each key
    partial = torch.empty(triton.cdiv(Q, BQ), 3, n, device=query.device, dtype=torch.float32)
    qs = query_scale.to(torch.float32).contiguous() if query_scale is not None else query
    xs = train_scale.to(torch.float32).contiguous() if train_scale is not None else train
    grid = lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(Q, BQ))  # noqa: E731
    _score_kernel[grid](
        query,
        train,
        qs,
        xs,
        words,
        partial,
        Q,
        n,
        D,
        index_offset,
        *query.stride(),
        *train.stride(),
        words.stride(0),
        2,
        *partial.stride(),
        HAS_QS=query_scale is not None,
        HAS_XS=train_scale is not None,
    )
    aggregates = torch.stack([partial[:, 0].sum(0), partial[:, 1].sum(0), partial[:, 2].amax(0)])
    if prev is not None:
        keys = torch.cat([encode_keys(prev.values.to(torch.float32), prev.indices), keys], dim=1)
    top = torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=True).values
    return decode_keys(top), aggregates
