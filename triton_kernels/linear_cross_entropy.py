"""Linear + cross-entropy without the (N, V) logits: the three backend functions of
``fastinfluence.ops.linear_cross_entropy``.

Tokens go in chunks of ``rows``. For each chunk the logits block z = hidden_c @ weight^T
comes from the library matmul in the inputs' dtype (as the model's own LM head computes
it); a Triton kernel then walks each row once in float32:

* forward: bias, soft-capping, an online logsumexp and the target logit -> loss and lse;
  nothing of the block is kept.
* backward: dL/dz = grad_loss * (softmax - onehot) * dlogits/dz, written over the block in
  place; then grad_hidden_c = dz @ weight and grad_weight += dz^T @ hidden_c (the matmul
  accumulates in float32; the running sum is kept in weight.dtype, one rounding per chunk).

Peak extra memory is one (rows, V) block, against the (N, V) float32 logits, softmax and
gradient of the materialised path.

* forward_grad (frozen head): one fused kernel, no logits block at all. A program takes BM
  tokens and a slice of the vocabulary and walks it once in BV-wide blocks: z = h W_v^T
  (+ b, capped) on the tensor cores, an online max m and sum l of exp(z - m), and
  acc += exp(z - m) dlogits/dz W_v, rescaled by exp(m_old - m_new) whenever the max grows
  (as flash attention rescales its output). acc (BM, H) lives in a float32 scratch row
  block (padded to whole tiles, read and written without masks) that stays in L2. Two head
  matmuls per token, one pass over V. Slices of V run in parallel when there are few tokens;
  a small combine merges their (m, l, acc) and forms dh = acc / l - dlogits/dz_y W_y and
  loss = m + log l - logit_y. Given P_out (a captured head's output projection), a second
  accumulator accP += exp(z - m) dlogits/dz P_v (float32, about float32 accuracy) gives
  G P_out = accP / l - dlogits/dz_y P_y in the same pass; without dh (a captured head alone)
  the H-wide accumulator is skipped.

float64 runs on the torch path of the op module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, KERNEL_DTYPES, autotune, dot, dot_f32, num_programs_target

# Bytes of one chunk's logits block: large chunks keep the matmuls efficient and the
# number of read-modify-writes of grad_weight small.
_CHUNK_BYTES = 512 * 2**20


def _block_v(V: int) -> int:
    return min(64 if INTERPRET.value else 4096, triton.next_power_of_2(V))


@triton.jit
def _softcap(z, SOFTCAP: tl.constexpr, cap):
    """float32 logits from z and dlogits/dz (1.0 without softcap)."""
    dcap = tl.full(z.shape, 1.0, tl.float32)
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0)  # tanh(z / cap), finite for any z
        z = cap * t
        dcap = 1.0 - t * t
    return z, dcap


@triton.jit
def _capped_logits(Z, Bias, v, v_ok, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, cap):
    """float32 logits of one block of a row (-inf past V) and dlogits/dz (1.0 without softcap)."""
    z = tl.load(Z + v, mask=v_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(Bias + v, mask=v_ok, other=0.0).to(tl.float32)
    z, dcap = _softcap(z, SOFTCAP, cap)
    return tl.where(v_ok, z, float("-inf")), dcap


@triton.jit
def _forward_kernel(
    Z,
    Bias,
    Labels,
    Loss,
    Lse,
    V,
    s_zn,
    ignore_index,
    cap,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Z += row * s_zn
    label = tl.load(Labels + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    target = tl.zeros((), tl.float32)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x, _ = _capped_logits(Z, Bias, v, v < V, SOFTCAP, HAS_BIAS, cap)
        target += tl.sum(tl.where(v == label, x, 0.0))
        m_new = tl.maximum(m, tl.max(x))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new))
        m = m_new
    lse = m + tl.log(s)
    tl.store(Lse + row, lse)
    tl.store(Loss + row, tl.where(label != ignore_index, lse - target, 0.0))


@triton.jit
def _grad_logits_kernel(
    Z,
    Bias,
    Labels,
    Lse,
    GradLoss,
    V,
    s_zn,
    ignore_index,
    cap,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Z += row * s_zn
    label = tl.load(Labels + row)
    lse = tl.load(Lse + row)
    scale = tl.where(label != ignore_index, tl.load(GradLoss + row), 0.0)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        v_ok = v < V
        x, dcap = _capped_logits(Z, Bias, v, v_ok, SOFTCAP, HAS_BIAS, cap)
        dz = (tl.exp(x - lse) - tl.where(v == label, 1.0, 0.0)) * scale * dcap
        tl.store(Z + v, dz.to(Z.dtype.element_ty), mask=v_ok)


@triton.jit
def _mm(a, b, acc, F32: tl.constexpr):
    """acc + a @ b; float32 operands at about float32 accuracy (3xTF32), others on the tensor cores as they are."""
    if F32:
        return dot_f32(a, b, acc)
    return dot(a, b, acc)


@triton.jit
def _project_block(p, alpha, AccP, P, rows, v, v_ok, K, KP, s_pv, BC: tl.constexpr):
    """AccP[rows] = alpha AccP[rows] + p P[v] over K in BC-wide column tiles (3xTF32, float32 p and P)."""
    for k0 in range(0, K, BC):
        c = k0 + tl.arange(0, BC)
        accp_ptr = AccP + rows[:, None] * KP + c[None, :]
        accp = tl.load(accp_ptr) * alpha[:, None]
        pw = tl.load(P + v[:, None] * s_pv + c[None, :], mask=v_ok[:, None] & (c < K)[None, :], other=0.0)
        tl.store(accp_ptr, _mm(p, pw, accp, True))


@autotune(
    gpu_configs=[
        triton.Config({"BK": 64, "BH": 64}, num_warps=4, num_stages=3),
        triton.Config({"BK": 64, "BH": 128}, num_warps=8, num_stages=3),
        triton.Config({"BK": 32, "BH": 64}, num_warps=4, num_stages=4),
        triton.Config({"BK": 128, "BH": 64}, num_warps=8, num_stages=2),
    ],
    interpret_config=triton.Config({"BK": 16, "BH": 16}),
    key=["H", "V", "F32"],
)
@triton.jit
def _forward_grad_kernel(
    Hid,
    W,
    Bias,
    Labels,
    Max,
    Sum,
    Target,
    Acc,
    P,
    AccP,
    N,
    H,
    V,
    K,
    NP,
    HP,
    KP,
    v_per_split,
    s_hn,
    s_wv,
    s_pv,
    cap,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    F32: tl.constexpr,
    NEED_DH: tl.constexpr,
    HAS_P: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    BH: tl.constexpr,
):
    """Partial (max, sum, target logit, acc, accP) of BM tokens over one slice of the vocabulary.

    Max, Sum, Target: (splits, N) float32; Acc: (splits, NP, HP) float32 (``NEED_DH``), AccP:
    (splits, NP, KP) float32, sum_v exp(z - m) dlogits/dz P[v] for a float32 P (V, K) (``HAS_P``,
    the captured head's projected G, in float32 at about float32 accuracy), both finite on entry
    (multiplied by 0 before their first use, so a rerun by the autotuner starts afresh).

    Registers (sm_90, from ``compile_check``): the scratch is padded (NP a multiple of BM, HP and
    KP of every BH), so its tiles load and store without masks; masked, the software pipeliner
    carried two (BM, BH) offset tiles and two mask tiles through each inner loop. dh is
    accumulated before G P_out, so the 16-bit copy of p is dead while the float32 p and its TF32
    halves feed the projection, and with 16-bit inputs the projection walks K in BH / 2-wide
    tiles (half the accumulator and P tiles held at once; the same FLOPs and bytes, still one
    pass over V). Together they remove the spill of the NEED_DH and HAS_P variant (272 B per
    thread in bfloat16 at 4 warps). Halving the tile does not help float32 (its spills come from
    the 3xTF32 logits loop) and is not applied there.
    """
    split = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < N
    label = tl.load(Labels + rows, mask=row_ok, other=-1)
    Acc += split * NP * HP
    AccP += split * NP * KP
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    target = tl.zeros((BM,), tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        v = v0 + tl.arange(0, BV).to(tl.int64)
        v_ok = v < v_hi
        z = tl.zeros((BM, BV), tl.float32)
        for k0 in range(0, H, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < H
            h = tl.load(Hid + rows[:, None] * s_hn + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + v[None, :] * s_wv + k[:, None], mask=v_ok[None, :] & k_ok[:, None], other=0.0)
            z = _mm(h, w, z, F32)
        if HAS_BIAS:
            z += tl.load(Bias + v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        z, dcap = _softcap(z, SOFTCAP, cap)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        target += tl.sum(tl.where(v[None, :] == label[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        p = p * dcap
        if NEED_DH:
            for h0 in range(0, H, BH):
                c = h0 + tl.arange(0, BH)
                acc_ptr = Acc + rows[:, None] * HP + c[None, :]
                acc = tl.load(acc_ptr) * alpha[:, None]
                w = tl.load(W + v[:, None] * s_wv + c[None, :], mask=v_ok[:, None] & (c < H)[None, :], other=0.0)
                tl.store(acc_ptr, _mm(p.to(W.dtype.element_ty), w, acc, F32))
        if HAS_P:
            if F32 or BH < 32:
                _project_block(p, alpha, AccP, P, rows, v, v_ok, K, KP, s_pv, BH)
            else:
                _project_block(p, alpha, AccP, P, rows, v, v_ok, K, KP, s_pv, BH // 2)
    out = split * N + rows
    tl.store(Max + out, m, mask=row_ok)
    tl.store(Sum + out, s, mask=row_ok)
    tl.store(Target + out, target, mask=row_ok)


def _rows(n: int, v: int, itemsize: int, chunk_rows: int | None) -> int:
    return max(1, min(n, chunk_rows or _CHUNK_BYTES // (v * itemsize)))


def _common_args(weight, bias, softcap):
    V = weight.shape[0]
    return dict(
        V=V,
        cap=float(softcap or 1.0),
        SOFTCAP=softcap is not None,
        HAS_BIAS=bias is not None,
        BV=_block_v(V),
        num_warps=8,
    )


def _supports(hidden) -> bool | str:
    return True if hidden.dtype in KERNEL_DTYPES else f"{hidden.dtype} inputs"


def supports_linear_cross_entropy_forward(hidden, **_) -> bool | str:
    return _supports(hidden)


def supports_linear_cross_entropy_backward(hidden, **_) -> bool | str:
    return _supports(hidden)


def supports_linear_cross_entropy_forward_grad(hidden, **_) -> bool | str:
    return _supports(hidden)


def linear_cross_entropy_forward(hidden, weight, bias, labels, ignore_index, softcap, chunk_rows=None):
    """loss (N,) float32 (0 at ignored tokens) and lse (N,) float32.

    hidden: (N, H), weight: (V, H), bias: (V,) or None, one dtype; labels: (N,) int64.
    ``chunk_rows`` overrides the tokens per chunk (default: a 512 MiB logits block).
    """
    n = hidden.shape[0]
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
    rows = _rows(n, weight.shape[0], hidden.element_size(), chunk_rows)
    bias_arg = bias.contiguous() if bias is not None else weight
    labels = labels.contiguous()
    for s in range(0, n, rows):
        z = hidden[s : s + rows] @ weight.T
        _forward_kernel[(z.shape[0],)](
            z,
            bias_arg,
            labels[s : s + rows],
            loss[s:],
            lse[s:],
            s_zn=z.stride(0),
            ignore_index=ignore_index,
            **_common_args(weight, bias, softcap),
        )
    return loss, lse


def linear_cross_entropy_backward(
    hidden,
    weight,
    bias,
    labels,
    lse,
    grad_loss,
    ignore_index,
    softcap,
    need_grad_weight,
    need_grad_bias,
    chunk_rows=None,
):
    """grad_hidden (N, H) in hidden.dtype; grad_weight (V, H) and grad_bias (V,) in weight.dtype, or None.

    Gradients of sum_n grad_loss_n * loss_n for any signed float32 ``grad_loss`` (N,).
    """
    n = hidden.shape[0]
    grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_grad_bias else None
    rows = _rows(n, weight.shape[0], hidden.element_size(), chunk_rows)
    bias_arg = bias.contiguous() if bias is not None else weight
    labels, lse, grad_loss = labels.contiguous(), lse.contiguous(), grad_loss.to(torch.float32).contiguous()
    for s in range(0, n, rows):
        x = hidden[s : s + rows]
        dz = x @ weight.T
        _grad_logits_kernel[(dz.shape[0],)](
            dz,
            bias_arg,
            labels[s : s + rows],
            lse[s:],
            grad_loss[s:],
            s_zn=dz.stride(0),
            ignore_index=ignore_index,
            **_common_args(weight, bias, softcap),
        )
        torch.mm(dz, weight, out=grad_hidden[s : s + rows])
        if grad_weight is not None:
            grad_weight.addmm_(dz.T, x)
        if grad_bias is not None:
            grad_bias += dz.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if grad_bias is not None else None


# Float32 scratch for the partial accumulators of the V slices: (splits, N, H), padded.
_SCRATCH_BYTES = 256 * 2**20


def _scratch_cols() -> int:
    """Column multiple of the scratch: every BH the autotuner may pick divides it."""
    return max(c.kwargs["BH"] for c in _forward_grad_kernel.configs)


def _v_splits(n: int, h: int, v: int, bm: int, bv: int, device: torch.device) -> tuple[int, int]:
    """(splits, vocabulary entries per split, a multiple of ``bv``): enough programs to fill the
    device when there are few row blocks, within the scratch budget."""
    want = triton.cdiv(num_programs_target(device), triton.cdiv(n, bm))
    fit = _SCRATCH_BYTES // max(n * h * 4, 1)
    splits = max(1, min(want, fit, triton.cdiv(v, bv)))
    per = triton.cdiv(triton.cdiv(v, splits), bv) * bv
    return triton.cdiv(v, per), per


def linear_cross_entropy_forward_grad(
    hidden, weight, bias, labels, ignore_index, softcap, P_out=None, need_dh=True, splits=None
):
    """loss (N,) float32 (0 at ignored tokens) and grad_hidden (N, H) in hidden.dtype, dloss_n/dhidden_n
    (None without ``need_dh``); given ``P_out`` (V, k_out), also GP (N, k_out) float32 = dloss_n/dz_n @
    P_out, accumulated in the same pass over the vocabulary (a captured head's projected G).

    hidden: (N, H), weight: (V, H), bias: (V,) or None, one dtype; labels: (N,) int64.
    ``splits`` overrides the number of vocabulary slices run in parallel (tests).
    """
    n, H = hidden.shape
    V = weight.shape[0]
    K = P_out.shape[1] if P_out is not None else 0
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_dh else None
    GP = torch.zeros(n, K, device=hidden.device, dtype=torch.float32) if P_out is not None else None
    if n == 0:
        return (loss, grad_hidden) if P_out is None else (loss, grad_hidden, GP)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bm, bv = (16, 32) if INTERPRET.value else (64, 64)
    # Scratch padded to whole tiles (rows to BM, columns to every config's BH): unmasked tiles.
    NP, HP, KP = (triton.cdiv(x, b) * b for x, b in ((n, bm), (H, _scratch_cols()), (K, _scratch_cols())))
    if splits is None:
        splits, per = _v_splits(NP, HP if need_dh else KP, V, bm, bv, hidden.device)
    else:
        per = triton.cdiv(triton.cdiv(V, splits), bv) * bv
        splits = triton.cdiv(V, per)
    stats = torch.empty(3, splits, n, device=hidden.device, dtype=torch.float32)
    acc = torch.zeros(splits, NP, HP, device=hidden.device, dtype=torch.float32) if need_dh else stats
    P = P_out.to(hidden.device, torch.float32).contiguous() if P_out is not None else stats
    acc_p = torch.zeros(splits, NP, KP, device=hidden.device, dtype=torch.float32) if P_out is not None else stats
    _forward_grad_kernel[(triton.cdiv(n, bm), splits)](
        hidden,
        weight,
        bias.contiguous() if bias is not None else weight,
        labels.contiguous(),
        stats[0],
        stats[1],
        stats[2],
        acc,
        P,
        acc_p,
        n,
        H,
        V,
        K,
        NP,
        HP,
        KP,
        per,
        hidden.stride(0),
        weight.stride(0),
        P.stride(0) if P_out is not None else 0,
        float(softcap or 1.0),
        SOFTCAP=softcap is not None,
        HAS_BIAS=bias is not None,
        F32=hidden.dtype == torch.float32,
        NEED_DH=need_dh,
        HAS_P=P_out is not None,
        BM=bm,
        BV=bv,
    )
    m_split, s_split, t_split = stats
    m = m_split.max(0).values
    scale = torch.exp(m_split - m)  # each slice's exp(m_s - m)
    total = (scale * s_split).sum(0)
    target = t_split.sum(0)  # only the slice holding the label adds a non-zero logit
    valid = labels != ignore_index
    loss.copy_(torch.where(valid, m + torch.log(total) - target, 0.0))
    dcap_y = 1.0 - (target / softcap) ** 2 if softcap is not None else torch.ones_like(target)
    y = torch.where(valid, labels, 0)

    def combine(partial, rows_y):
        out = torch.einsum("sn,snh->nh", scale / total, partial) if splits > 1 else partial[0].div_(total.unsqueeze(1))
        out -= dcap_y.unsqueeze(1) * rows_y
        return out.mul_(valid.unsqueeze(1))

    if need_dh:
        grad_hidden.copy_(combine(acc[:, :n, :H], weight[y].float()))
    if P_out is None:
        return loss, grad_hidden
    GP.copy_(combine(acc_p[:, :n, :K], P[y]))
    return loss, grad_hidden, GP
