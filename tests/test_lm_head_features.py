"""LM-head features from one forward equal the autograd path; the op equals a plain-torch gradient."""

import pytest
import torch
from helpers import batches_of, make_examples, rel_err, tiny_model

import fastinfluence as fi
from fastinfluence.ops.lm_head_grad import lm_head_grad_projected


@pytest.mark.parametrize("softcap,bias", [(None, False), (3.0, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_op_equals_autograd(softcap, bias, dtype, tol):
    g = torch.Generator().manual_seed(7)
    N, H, V, k = 37, 12, 53, 5
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    w = torch.rand(N, generator=g, dtype=dtype) + 0.5
    P = torch.randn(V, k, generator=g, dtype=dtype)
    z = (hidden @ weight.T + (b if bias else 0)).requires_grad_(True)
    logits = z if softcap is None else softcap * torch.tanh(z / softcap)
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    (G,) = torch.autograd.grad((ce * w).sum(), z)
    out = lm_head_grad_projected(hidden, weight, labels, w, P, bias=b, softcap=softcap)
    assert rel_err(out, G @ P) < tol
    assert torch.all(out[::4] == 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_head_features_equal_the_autograd_path(side):
    model = tiny_model("llama", dtype=torch.float64)
    ex = fi.GradientExtractor(model, fi.ProjectionConfig(include=[r"lm_head"], rank_in=8, rank_out=16))
    assert ex._head is not None
    batches = batches_of(make_examples(5, seed=11), 2, side)
    fast = ex.extract(batches)
    ex._head = None  # the backward path through the capture pass
    ref = ex.extract(batches)
    assert rel_err(fast.data, ref.data) < 1e-12 and fast.ids == ref.ids
