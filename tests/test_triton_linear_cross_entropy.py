"""Triton linear_cross_entropy_{forward,backward,forward_grad} against F.cross_entropy on materialised logits."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from test_triton_support import DEVICES, randn

from fastinfluence.triton_kernels import (
    linear_cross_entropy_backward,
    linear_cross_entropy_forward,
    linear_cross_entropy_forward_grad,
)

IGNORE = -100
# float32: float32 logits both ways. bfloat16: both paths round the logits and dL/dz to
# bfloat16 (2^-9 relative) before the matmuls; they differ in where the bias is added.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(device, dtype, N, H, V, bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = randn(N, H, dtype=dtype, device=device, generator=g)
    weight = randn(V, H, dtype=dtype, device=device, generator=g, scale=H**-0.5)
    b = randn(V, dtype=dtype, device=device, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.25] = IGNORE
    grad_loss = torch.randn(N, generator=g)  # signed: gradient ascent and weights of both signs
    return hidden, weight, b, labels.to(device), grad_loss.to(device)


def _materialised(hidden, weight, bias, labels, grad_loss, softcap):
    """Loss and (grad_hidden, grad_weight, grad_bias) of sum(grad_loss * loss) through autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    logits = leaves[0] @ leaves[1].T
    if bias is not None:
        logits = logits + leaves[2]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    (loss * grad_loss).sum().backward()
    grads = [t.grad for t in leaves]
    return loss.detach(), grads + [None] * (3 - len(grads))


def _fused(hidden, weight, bias, labels, grad_loss, softcap, need_grad_weight=True, chunk_rows=10):
    loss, lse = linear_cross_entropy_forward(hidden, weight, bias, labels, IGNORE, softcap, chunk_rows=chunk_rows)
    grads = linear_cross_entropy_backward(
        hidden,
        weight,
        bias,
        labels,
        lse,
        grad_loss,
        IGNORE,
        softcap,
        need_grad_weight,
        bias is not None,
        chunk_rows=chunk_rows,
    )
    return loss, lse, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 3.0), (True, 3.0)])
def test_loss_and_grads_match_materialised_logits(device, dtype, bias, softcap, poisoned):
    # N = 37 in chunks of 10 (ragged last chunk); V = 101 spans several vocabulary blocks.
    inputs = _inputs(device, dtype, N=37, H=24, V=101, bias=bias, seed=1)
    loss, _, grads = _fused(*inputs, softcap)
    ref_loss, ref_grads = _materialised(*inputs, softcap)
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) <= TOL[dtype]
    for got, ref, leaf in zip(grads, ref_grads, inputs[:3]):
        if leaf is None:
            assert got is None
            continue
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_lse_is_logsumexp_and_ignored_tokens_get_no_loss_or_gradient(device, poisoned):
    hidden, weight, bias, labels, grad_loss = _inputs(device, torch.float32, N=23, H=16, V=70, bias=True, seed=2)
    loss, lse, (grad_hidden, _, _) = _fused(hidden, weight, bias, labels, grad_loss, None)
    assert rel_err(lse, torch.logsumexp(hidden @ weight.T + bias, dim=1)) <= 1e-6
    ignored = labels == IGNORE
    assert bool(ignored.any()) and bool((loss[ignored] == 0).all()) and bool((grad_hidden[ignored] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_is_skipped_when_not_needed(device, poisoned):
    inputs = _inputs(device, torch.float32, N=12, H=16, V=40, bias=False, seed=3)
    _, _, (grad_hidden, grad_weight, grad_bias) = _fused(*inputs, None, need_grad_weight=False)
    _, (ref_hidden, _, _) = _materialised(*inputs, None)
    assert grad_weight is None and grad_bias is None
    assert rel_err(grad_hidden, ref_hidden) <= TOL[torch.float32]


@pytest.mark.gpu
def test_large_vocabulary_default_chunks_on_gpu(poisoned):
    inputs = _inputs("cuda", torch.bfloat16, N=1000, H=512, V=32003, bias=False, seed=4)
    loss, _, grads = _fused(*inputs, 30.0, chunk_rows=None)
    ref_loss, ref_grads = _materialised(*inputs, 30.0)
    assert rel_err(loss, ref_loss) <= TOL[torch.bfloat16]
    assert rel_err(grads[0], ref_grads[0]) <= TOL[torch.bfloat16]
    assert rel_err(grads[1], ref_grads[1]) <= TOL[torch.bfloat16]


def test_float64_runs_on_the_torch_path():
    from fastinfluence import ops

    hidden, weight, bias, labels, grad_loss = _inputs("cpu", torch.float64, N=9, H=8, V=20, bias=True, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    with ops.use_backend("triton"), ops.trace() as ran:
        loss = ops.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], ignore_index=IGNORE, softcap=2.0)
        (loss * grad_loss).sum().backward()
    ref_loss, ref_grads = _materialised(hidden, weight, bias, labels, grad_loss, 2.0)
    assert [d.backend for d in ran] == ["torch", "torch"]  # forward and backward
    assert loss.dtype == torch.float64 and rel_err(loss.detach(), ref_loss) <= 1e-12
    assert all(rel_err(t.grad, r) <= 1e-12 for t, r in zip(leaves, ref_grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 3.0), (True, 3.0)])
@pytest.mark.parametrize("splits", [1, 4])
def test_forward_grad_matches_materialised_logits(device, dtype, bias, softcap, splits, poisoned):
    # N = 37 tokens in blocks of 16 (ragged), H = 24 not a multiple of the 16-wide tiles, V = 101
    # in one slice or four of 32 (the combine of partial maxima, sums and accumulators).
    hidden, weight, b, labels, _ = _inputs(device, dtype, N=37, H=24, V=101, bias=bias, seed=6)
    loss, grad_hidden = linear_cross_entropy_forward_grad(hidden, weight, b, labels, IGNORE, softcap, splits=splits)
    ref_loss, (ref_hidden, _, _) = _materialised(
        hidden, weight, b, labels, torch.ones_like(labels, dtype=torch.float32), softcap
    )
    assert loss.dtype == torch.float32 and grad_hidden.dtype == dtype and grad_hidden.shape == hidden.shape
    assert rel_err(loss, ref_loss) <= TOL[dtype]
    assert rel_err(grad_hidden, ref_hidden) <= TOL[dtype]
    ignored = labels == IGNORE
    assert bool(ignored.any()) and bool((loss[ignored] == 0).all()) and bool((grad_hidden[ignored] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_head_runs_forward_grad_on_triton_for_signed_upstream(device, poisoned):
    from fastinfluence import ops

    hidden, weight, bias, labels, grad_loss = _inputs(device, torch.float32, N=29, H=16, V=70, bias=True, seed=7)
    h = hidden.clone().requires_grad_()
    with ops.use_backend("triton"), ops.trace() as ran:
        loss = ops.linear_cross_entropy(h, weight, labels, bias=bias, ignore_index=IGNORE, softcap=2.0)
        (loss * grad_loss).sum().backward()
    ref_loss, (ref_hidden, _, _) = _materialised(hidden, weight, bias, labels, grad_loss, 2.0)
    assert [(d.op, d.backend) for d in ran] == [("linear_cross_entropy_forward_grad", "triton")]
    assert rel_err(loss.detach(), ref_loss) <= TOL[torch.float32]
    assert rel_err(h.grad, ref_hidden) <= TOL[torch.float32]


@pytest.mark.gpu
def test_forward_grad_large_vocabulary_on_gpu(poisoned):
    hidden, weight, _, labels, _ = _inputs("cuda", torch.bfloat16, N=1000, H=896, V=32003, bias=False, seed=8)
    loss, grad_hidden = linear_cross_entropy_forward_grad(hidden, weight, None, labels, IGNORE, 30.0)
    ones = torch.ones(1000, device="cuda")
    ref_loss, (ref_hidden, _, _) = _materialised(hidden, weight, None, labels, ones, 30.0)
    assert rel_err(loss, ref_loss) <= TOL[torch.bfloat16]
    assert rel_err(grad_hidden, ref_hidden) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "bias,softcap,splits,need_dh", [(False, None, 1, True), (True, 3.0, 4, True), (True, None, 3, False)]
)
def test_forward_grad_with_p_out_matches_the_torch_op(device, dtype, bias, softcap, splits, need_dh, poisoned):
    """G P_out accumulated beside dh in the one pass over the vocabulary (a captured head), against the
    torch op in float64 on the same (rounded) inputs; k_out = 20 is not a multiple of the tiles."""
    from fastinfluence.ops.linear_cross_entropy import linear_cross_entropy_forward_grad as torch_op

    hidden, weight, b, labels, _ = _inputs(device, dtype, N=37, H=24, V=101, bias=bias, seed=9)
    P_out = randn(101, 20, device=device, generator=torch.Generator().manual_seed(10))
    loss, dh, GP = linear_cross_entropy_forward_grad(
        hidden, weight, b, labels, IGNORE, softcap, P_out=P_out, need_dh=need_dh, splits=splits
    )
    f64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
    ref_loss, ref_dh, ref_GP = torch_op(f64[0], f64[1], f64[2], labels, IGNORE, softcap, P_out=P_out.double())
    assert GP.dtype == torch.float32 and GP.shape == (37, 20)
    assert rel_err(loss, ref_loss) <= TOL[dtype] and rel_err(GP, ref_GP) <= TOL[dtype]
    assert (dh is None) != need_dh
    if need_dh:
        assert rel_err(dh, ref_dh) <= TOL[dtype]
    ignored = labels == IGNORE
    assert bool(ignored.any()) and bool((GP[ignored] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_a_captured_head_runs_its_projected_gradient_on_triton(device, poisoned):
    """lm_head_grad dispatches the head's walk to the Triton forward_grad with P_out (and without dh
    when the head is captured alone): the same loss and G P_out as the torch path."""
    from fastinfluence import ops
    from fastinfluence.ops.lm_head_grad import lm_head_loss_grad_projected

    hidden, weight, b, labels, _ = _inputs(device, torch.float32, N=21, H=16, V=70, bias=True, seed=11)
    P_out = randn(70, 12, device=device, generator=torch.Generator().manual_seed(12))
    with ops.use_backend("torch"):
        ref = lm_head_loss_grad_projected(hidden, weight, labels, P_out, bias=b, softcap=2.0)
    for need_dh in (True, False):
        with ops.use_backend("triton"), ops.trace() as ran:
            loss, dh, GP = lm_head_loss_grad_projected(hidden, weight, labels, P_out, b, 2.0, need_dh=need_dh)
        assert [(d.op, d.backend) for d in ran] == [("linear_cross_entropy_forward_grad", "triton")]
        assert rel_err(loss, ref[0]) <= TOL[torch.float32] and rel_err(GP, ref[2]) <= TOL[torch.float32]
        assert (dh is None) != need_dh and (dh is None or rel_err(dh, ref[1]) <= TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [None, {"BK": 16, "BH": 32}])
def test_forward_grad_with_dh_and_p_out_on_odd_shapes(device, dtype, tiles, monkeypatch, poisoned):
    """dh and G P_out together on shapes that are multiples of no tile (N = 33, H = 23, V = 97, k_out = 19),
    against the torch op in float64 on the same (rounded) inputs. The scratch is padded to whole tiles and
    read back cut to (N, H) and (N, k_out); with BH = 32 the 16-bit projection walks k_out in BH / 2-wide
    tiles (the sm_90 register budget), float32 in BH-wide ones."""
    import triton

    from fastinfluence.ops.linear_cross_entropy import linear_cross_entropy_forward_grad as torch_op
    from fastinfluence.triton_kernels import linear_cross_entropy as lce

    if tiles is not None:
        monkeypatch.setattr(lce._forward_grad_kernel, "configs", [triton.Config(tiles)])
    hidden, weight, b, labels, _ = _inputs(device, dtype, N=33, H=23, V=97, bias=True, seed=13)
    P_out = randn(97, 19, device=device, generator=torch.Generator().manual_seed(14))
    loss, dh, GP = linear_cross_entropy_forward_grad(hidden, weight, b, labels, IGNORE, 3.0, P_out=P_out, splits=3)
    f64 = [t.double() for t in (hidden, weight, b)]
    ref_loss, ref_dh, ref_GP = torch_op(*f64, labels, IGNORE, 3.0, P_out=P_out.double())
    assert dh.shape == (33, 23) and dh.dtype == dtype and GP.shape == (33, 19) and GP.dtype == torch.float32
    assert rel_err(loss, ref_loss) <= TOL[dtype] and rel_err(dh, ref_dh) <= TOL[dtype]
    assert rel_err(GP, ref_GP) <= TOL[dtype]
    ignored = labels == IGNORE
    assert bool(ignored.any()) and bool((GP[ignored] == 0).all()) and bool((dh[ignored] == 0).all())
