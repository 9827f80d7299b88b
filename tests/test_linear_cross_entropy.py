"""ops.linear_cross_entropy against F.cross_entropy on materialised logits."""

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from fastinfluence import ops
from fastinfluence.ops import _backend
from fastinfluence.ops.linear_cross_entropy import _chunk_rows, linear_cross_entropy

# The package attribute of the same name is the function; the module is needed to spy on it.
lce_module = sys.modules["fastinfluence.ops.linear_cross_entropy"]
DEFAULT_MIN_CHUNK = lce_module.MIN_CHUNK_ELEMENTS

# Odd shapes; N * H / V rows per chunk gives several chunks and a ragged last one.
N, H, V = 37, 24, 101


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Drop the chunk-size floor so that these small shapes are split into several chunks."""
    monkeypatch.setattr(lce_module, "MIN_CHUNK_ELEMENTS", 0)


def make_inputs(dtype, bias=False, seed=0, shape=(N,)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.25] = -100
    # Random signed per-token upstream gradients: gradient ascent and weights of both signs.
    w = torch.randn(shape, generator=g)
    return hidden, weight, b, labels, w


def materialised(hidden, weight, bias, labels, softcap):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").reshape(labels.shape)


def loss_and_grads(fn, hidden, weight, bias, labels, w, softcap):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, labels, softcap)
    (loss * w).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def fused(hidden, weight, bias, labels, softcap):
    return linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=softcap)


@pytest.mark.parametrize("n, h, v", [(4096, 1024, 32000), (1024, 512, 128256), (16384, 4096, 128256)])
def test_default_chunk_holds_at_most_a_hidden_sized_or_64mib_logits_block(n, h, v, monkeypatch):
    monkeypatch.setattr(lce_module, "MIN_CHUNK_ELEMENTS", DEFAULT_MIN_CHUNK)
    rows = lce_module._chunk_rows(n, h, v)
    assert rows * v <= max(n * h, 2**24) + v and rows < n


def test_shapes_span_several_chunks():
    assert 1 < _chunk_rows(N, H, V) < N and N % _chunk_rows(N, H, V) != 0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_float32_loss_and_grads_match_materialised_logits(bias, softcap):
    inputs = make_inputs(torch.float32, bias=bias, seed=1)
    out, grads = loss_and_grads(fused, *inputs, softcap)
    ref, ref_grads = loss_and_grads(materialised, *inputs, softcap)
    assert out.dtype == torch.float32
    # float32 with H=24: only summation order differs.
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_float64_matches_to_double_precision():
    inputs = make_inputs(torch.float64, bias=True, seed=2)
    out, grads = loss_and_grads(fused, *inputs, 5.0)
    ref, ref_grads = loss_and_grads(materialised, *inputs, 5.0)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_is_as_accurate_as_materialised_bfloat16(bias):
    inputs = make_inputs(torch.bfloat16, bias=bias, seed=3)
    exact = [t.double() if t is not None and t.is_floating_point() else t for t in inputs[:3]] + list(inputs[3:])
    truth, truth_grads = loss_and_grads(materialised, *exact, None)
    out, grads = loss_and_grads(fused, *inputs, None)
    naive, naive_grads = loss_and_grads(materialised, *inputs, None)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%): the logits and gradients
    # are rounded once each, so both paths are off by ~3e-3 and the fused one no worse.
    assert rel_err(out, truth) < 5e-3
    assert rel_err(out, truth) <= 2 * rel_err(naive, truth) + 1e-3
    for g, n, t in zip(grads, naive_grads, truth_grads):
        assert rel_err(g, t) < 1e-2
        assert rel_err(g, t) <= 2 * rel_err(n, t) + 1e-3


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions_match_cross_entropy(reduction):
    hidden, weight, bias, labels, _ = make_inputs(torch.float32, bias=True, seed=4)
    out = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)
    ref = F.cross_entropy(hidden @ weight.T + bias, labels, reduction=reduction)
    assert rel_err(out, ref) < 1e-5


def test_leading_dims_are_kept():
    hidden, weight, _, labels, w = make_inputs(torch.float32, seed=5, shape=(3, 7))
    out, grads = loss_and_grads(fused, hidden, weight, None, labels, w, None)
    ref, ref_grads = loss_and_grads(materialised, hidden, weight, None, labels, w, None)
    assert out.shape == (3, 7)
    assert rel_err(out, ref) < 1e-5 and rel_err(grads[0], ref_grads[0]) < 1e-5


def test_ignored_tokens_have_zero_loss_and_gradient():
    hidden, weight, _, labels, _ = make_inputs(torch.float32, seed=6)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels)
    loss.sum().backward()
    ignored = labels == -100
    assert ignored.any() and (loss[ignored] == 0).all() and (h.grad[ignored] == 0).all()
    assert (loss[~ignored] > 0).all()


def test_weight_gradient_is_skipped_when_not_required(monkeypatch):
    reference, flags = lce_module.linear_cross_entropy_backward, []

    def spy(**args):
        flags.append((args["need_grad_weight"], args["need_grad_bias"]))
        return reference(**args)

    monkeypatch.setitem(_backend._ops, "linear_cross_entropy_backward", spy)  # the torch reference the registry runs
    ops.set_backend("torch")
    try:
        hidden, weight, bias, labels, _ = make_inputs(torch.float32, bias=True, seed=7)
        linear_cross_entropy(hidden.requires_grad_(), weight, labels, bias=bias).sum().backward()
    finally:
        ops.set_backend("auto")
    assert flags == [(False, False)] and hidden.grad is not None


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(weight=torch.randn(V, H + 1)), "share H"),
        (dict(labels=torch.zeros(N + 1, dtype=torch.long)), "labels must have shape"),
        (dict(labels=torch.zeros(N)), "integer tensor"),
        (dict(hidden=torch.randn(N, H, dtype=torch.float64)), "one float dtype"),
        (dict(labels=torch.full((N,), V)), r"labels must lie in \[0, 101\)"),
        (dict(bias=torch.randn(V - 1)), "bias must be"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(softcap=0.0), "softcap must be a positive"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(change, match):
    hidden, weight, _, labels, _ = make_inputs(torch.float32, seed=8)
    kwargs = dict(hidden=hidden, weight=weight, labels=labels) | change
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_backend_on_gpu_matches_materialised_logits(dtype):
    inputs = [t.cuda() if t is not None else None for t in make_inputs(dtype, bias=True, seed=9, shape=(1031,))]
    out, grads = loss_and_grads(fused, *inputs, 30.0)
    ref, ref_grads = loss_and_grads(
        materialised, *[t.double() if t.is_floating_point() else t for t in inputs[:4]] + [inputs[4]], 30.0
    )
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(out, ref) < tol
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < tol
