"""ops.linear_cross_entropy against F.cross_entropy on materialised logits."""

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

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


def loss_and_grads(fn, hidden, weight, bias, labels, w, softcap, frozen=False):
    """Loss and the gradients of sum(w * loss): hidden's, and the head's unless ``frozen``."""
    hidden = hidden.clone().requires_grad_()
    head = [t.clone().requires_grad_(not frozen) for t in (weight, bias) if t is not None]
    loss = fn(hidden, head[0], head[1] if bias is not None else None, labels, softcap)
    (loss * w).sum().backward()
    return loss.detach(), [hidden.grad] + ([] if frozen else [t.grad for t in head])


class HeadMatmuls(TorchDispatchMode):
    """Records the rows of every matmul that produces (rows, V) logits or consumes them."""

    MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)

    def __init__(self, v):
        super().__init__()
        self.v, self.calls = v, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS:
            a, b = args[-2], args[-1]
            if self.v in (a.shape[1], b.shape[1]) or self.v in (a.shape[0], b.shape[0]):
                self.calls.append(a.shape[0] if a.shape[0] != self.v else a.shape[1])
        return out


def fused(hidden, weight, bias, labels, softcap):
    return linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=softcap)


@pytest.mark.parametrize("n, h, v", [(4096, 1024, 32000), (1024, 512, 128256), (16384, 4096, 128256)])
def test_default_chunk_holds_at_most_a_hidden_sized_or_64mib_logits_block(n, h, v, monkeypatch):
    monkeypatch.setattr(lce_module, "MIN_CHUNK_ELEMENTS", DEFAULT_MIN_CHUNK)
    rows = lce_module._chunk_rows(n, h, v)
    assert rows * v <= max(n * h, 2**24) + v and rows < n


def test_shapes_span_several_chunks():
    assert 1 < _chunk_rows(N, H, V) < N and N % _chunk_rows(N, H, V) != 0


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_float32_loss_and_grads_match_materialised_logits(bias, softcap, frozen):
    inputs = make_inputs(torch.float32, bias=bias, seed=1)
    out, grads = loss_and_grads(fused, *inputs, softcap, frozen)
    ref, ref_grads = loss_and_grads(materialised, *inputs, softcap, frozen)
    assert out.dtype == torch.float32 and len(grads) == len(ref_grads)
    # float32 with H=24: only summation order differs.
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("frozen", [False, True])
def test_float64_matches_to_double_precision(frozen):
    inputs = make_inputs(torch.float64, bias=True, seed=2)
    out, grads = loss_and_grads(fused, *inputs, 5.0, frozen)
    ref, ref_grads = loss_and_grads(materialised, *inputs, 5.0, frozen)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_is_as_accurate_as_materialised_bfloat16(bias, frozen):
    inputs = make_inputs(torch.bfloat16, bias=bias, seed=3)
    exact = [t.double() if t is not None and t.is_floating_point() else t for t in inputs[:3]] + list(inputs[3:])
    truth, truth_grads = loss_and_grads(materialised, *exact, None, frozen)
    out, grads = loss_and_grads(fused, *inputs, None, frozen)
    naive, naive_grads = loss_and_grads(materialised, *inputs, None, frozen)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%): the logits and gradients
    # are rounded once each (the frozen path rounds dh once more when it scales it by the
    # upstream gradient), so both paths are off by ~3e-3 and the fused one no worse.
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


def spy_ops(monkeypatch):
    """Names of the torch-reference ops the registry runs, in order."""
    ran = []
    for name in ("linear_cross_entropy_forward", "linear_cross_entropy_forward_grad", "linear_cross_entropy_backward"):
        reference = _backend._ops[name]

        def spy(_name=name, _reference=reference, **args):
            ran.append((_name, args.get("need_grad_weight"), args.get("need_grad_bias")))
            return _reference(**args)

        monkeypatch.setitem(_backend._ops, name, spy)
    return ran


def test_frozen_head_takes_the_input_gradient_in_the_forward(monkeypatch):
    ran = spy_ops(monkeypatch)
    hidden, weight, bias, labels, w = make_inputs(torch.float32, bias=True, seed=7)
    with ops.use_backend("torch"):
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, labels, bias=bias)
        (loss * w).sum().backward()
    assert ran == [("linear_cross_entropy_forward_grad", None, None)] and hidden.grad is not None


@pytest.mark.parametrize("trainable", ["weight", "bias"])
def test_trainable_head_recomputes_with_only_the_gradients_asked_for(monkeypatch, trainable):
    ran = spy_ops(monkeypatch)
    hidden, weight, bias, labels, w = make_inputs(torch.float32, bias=True, seed=7)
    head = dict(weight=weight, bias=bias)
    head[trainable].requires_grad_()
    with ops.use_backend("torch"):
        (linear_cross_entropy(hidden, labels=labels, **head) * w).sum().backward()
    assert ran == [
        ("linear_cross_entropy_forward", None, None),
        ("linear_cross_entropy_backward", trainable == "weight", trainable == "bias"),
    ]


def test_no_grad_runs_only_the_loss(monkeypatch):
    ran = spy_ops(monkeypatch)
    hidden, weight, bias, labels, _ = make_inputs(torch.float32, bias=True, seed=7)
    with ops.use_backend("torch"), torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), labels, bias=bias)
    assert [r[0] for r in ran] == ["linear_cross_entropy_forward"]
    assert rel_err(loss, materialised(hidden, weight, bias, labels, None) * (labels != -100)) < 1e-5


@pytest.mark.parametrize("frozen, matmuls_per_row", [(True, 2), (False, 4)])
def test_head_matmuls_cover_labelled_rows_only_and_frozen_head_never_recomputes(frozen, matmuls_per_row):
    # Frozen: logits once + dh once. Trainable: logits, recomputed logits, dz @ W, dz^T @ h.
    hidden, weight, _, labels, w = make_inputs(torch.float32, seed=10)
    hidden.requires_grad_()
    weight.requires_grad_(not frozen)
    with ops.use_backend("torch"), HeadMatmuls(V) as counted:
        (linear_cross_entropy(hidden, weight, labels) * w).sum().backward()
    n_lab = int((labels != -100).sum())
    chunks = -(-n_lab // _chunk_rows(n_lab, H, V))
    assert 0 < n_lab < N and chunks > 1
    assert len(counted.calls) == matmuls_per_row * chunks
    assert sum(counted.calls) == matmuls_per_row * n_lab


@pytest.mark.parametrize("frozen", [False, True])
def test_no_labelled_token_skips_the_head(frozen):
    hidden, weight, bias, labels, w = make_inputs(torch.float32, bias=True, seed=11)
    labels = torch.full_like(labels, -100)
    with HeadMatmuls(V) as counted:
        loss, grads = loss_and_grads(fused, hidden, weight, bias, labels, w, None, frozen)
        mean = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="mean")
    assert counted.calls == []
    assert loss.shape == labels.shape and bool((loss == 0).all())
    assert len(grads) == (1 if frozen else 3) and all(bool((g == 0).all()) for g in grads)
    assert bool(mean.isnan()) and bool(F.cross_entropy(hidden @ weight.T, labels, reduction="mean").isnan())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_at_either_end_and_examples_without_answer(side):
    # (B, T) batch: answers at one end, padding at the other; example 1 has no labelled token.
    hidden, weight, bias, _, _ = make_inputs(torch.float64, bias=True, seed=12, shape=(4, 9))
    g = torch.Generator().manual_seed(13)
    labels = torch.randint(0, V, (4, 9), generator=g)
    answer = torch.arange(9) < torch.tensor([[3], [0], [9], [5]])  # answer tokens at the start
    labels[~(answer.flip(1) if side == "left" else answer)] = -100
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    for frozen in (False, True):
        out, grads = loss_and_grads(fused, hidden, weight, bias, labels, w, 2.0, frozen)
        ref, ref_grads = loss_and_grads(materialised, hidden, weight, bias, labels, w, 2.0, frozen)
        assert rel_err(out, ref * (labels != -100)) < 1e-12 and bool((out[1] == 0).all())
        assert bool((grads[0][1] == 0).all())
        for got, want in zip(grads, ref_grads):
            assert rel_err(got, want) < 1e-12


def test_per_example_nonlinear_upstream_as_npo():
    # NPO-like: -(2/b) logsigmoid(-b * per-example NLL): a different, sign-varying upstream per
    # example; with signed example weights the token gradients take both signs.
    hidden, weight, bias, labels, _ = make_inputs(torch.float64, bias=True, seed=14, shape=(5, 8))
    example_w = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.3], dtype=torch.float64)

    def npo(fn):
        h = hidden.clone().requires_grad_()
        nll = fn(h, weight, bias, labels, None).sum(1)
        (example_w * -2 / 0.7 * F.logsigmoid(-0.7 * nll)).sum().backward()
        return h.grad

    assert rel_err(npo(fused), npo(lambda *a: materialised(*a) * (labels != -100))) < 1e-12


@pytest.mark.parametrize("frozen", [False, True])
def test_single_token(frozen):
    inputs = make_inputs(torch.float64, bias=True, seed=15, shape=(1,))
    inputs[3][0] = 7  # labelled
    out, grads = loss_and_grads(fused, *inputs, 4.0, frozen)
    ref, ref_grads = loss_and_grads(materialised, *inputs, 4.0, frozen)
    assert out.shape == (1,) and rel_err(out, ref) < 1e-12
    assert all(rel_err(g, r) < 1e-12 for g, r in zip(grads, ref_grads))


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
