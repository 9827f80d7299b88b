"""K-FAC / EK-FAC and the fitted normaliser on MoE experts, against brute force in float64.

The reference is independent of the capture: each example runs alone through the model's own
eager experts loop, every ``F.linear`` / matmul call on a router weight or on one expert's slice
of a fused parameter is recorded with its input, and ``torch.autograd.grad`` of the example's
mean answer-token loss gives the gradient of each recorded output. Those per-token (a, g) give
the covariance sums directly; the per-example weight gradients come from autograd on the fused
parameters (``test_moe.reference_gradients``), and the preconditioners are explicit dense
(d_out d_in')^2 matrices solved densely.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_of, make_examples, one_thread, rel_err
from test_moe import E, moe_model, reference_gradients
from torch.overrides import TorchFunctionMode

from fastinfluence import ProjectionConfig, fit_kfac, kfac_scores
from fastinfluence.capture import select_layers
from fastinfluence.lm import IGNORE_INDEX
from fastinfluence.normalizer import Normalizer

pytestmark = pytest.mark.filterwarnings("ignore:K-FAC fit on")  # few tokens per expert, on purpose
QUERIES, TRAIN = make_examples(3, seed=21), make_examples(6, seed=22)
# The routers and the experts of both MoE blocks: the layers whose factors are new here.
INCLUDE = [r"\.experts\.\d+\.", r"mlp\.(gate|router)$"]
# float64: the fast path and the reference differ in summation order and in eigh versus solve
# (the dense-K-FAC tests measure <= 2e-14); asked: 1e-8.
TOL64 = 1e-8


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """rel_err(out, ref) <= tol; for a zero ref (an expert no token reaches): out within tol of zero."""
    return rel_err(out, ref) <= tol if ref.any() else float(out.abs().max()) <= tol


class _Calls(TorchFunctionMode):
    """Records (layer name, input, output) of each F.linear / matmul whose weight is one of ``weights``
    (a router's weight, or expert e's slice of a fused parameter: a view at offset e * stride(0))."""

    def __init__(self, weights: dict):
        super().__init__()
        self.weights, self.calls = weights, []

    def _name(self, w):
        if not torch.is_tensor(w):
            return None
        base = w._base if w._base is not None else w
        for (pid, e), name in self.weights.items():
            if id(base) == pid and (e is None or w.storage_offset() == e * base.stride(0)):
                return name
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear or getattr(func, "__name__", None) in ("matmul", "__matmul__"):
            name = self._name(args[1] if len(args) > 1 else kwargs.get("weight"))
            if name is not None:
                self.calls.append((name, args[0], out))
        return out


def brute_force_tokens(model, examples, layers):
    """Per layer: [(a~ (n, d_in'), g (n, d_out)) per example], the rows of the tokens reaching it."""
    weights = {}
    for l in layers:
        weights[(id(l.parameter), l.expert) if l.routed else (id(l.module.weight), None)] = l.name
    out = {l.name: [] for l in layers}
    for ids, labels in examples:
        with torch.enable_grad():
            x = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
            with _Calls(weights) as seen:
                logits = model(inputs_embeds=x, use_cache=False).logits[0, :-1]
            keep = labels[1:] != IGNORE_INDEX
            loss = F.cross_entropy(logits[keep].double(), labels[1:][keep])
            grads = torch.autograd.grad(loss, [o for _, _, o in seen.calls])
        rows = {l.name: ([], []) for l in layers}
        for (name, a, _), g in zip(seen.calls, grads):
            rows[name][0].append(a.detach().reshape(-1, a.shape[-1]))
            rows[name][1].append(g.reshape(-1, g.shape[-1]))
        for l in layers:
            a, g = rows[l.name]
            d_in = l.d_in
            a = torch.cat(a) if a else torch.zeros(0, d_in, dtype=torch.float64)
            g = torch.cat(g) if g else torch.zeros(0, l.d_out, dtype=torch.float64)
            if l.bias:
                a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
            out[l.name].append((a, g))
    return out


@functools.cache
def case(arch):
    model = moe_model(arch)
    layers = select_layers(model, INCLUDE)
    names = [l.name for l in layers]
    tokens = brute_force_tokens(model, TRAIN, layers)
    Gq, Gt = reference_gradients(model, QUERIES, names), reference_gradients(model, TRAIN, names)
    return model, layers, tokens, Gq, Gt


def dense_reference(arch, method):
    """(Q, N) sum over layers of g_q^T H^-1 g_i, H the explicit (EK-)FAC matrix of brute-force factors."""
    _, layers, tokens, Gq, Gt = case(arch)
    out, start = 0.0, 0
    for l in layers:
        n = l.d_out * (l.d_in + int(l.bias))
        gq, gt = Gq[:, start : start + n], Gt[:, start : start + n]
        start += n
        rows = sum(len(a) for a, _ in tokens[l.name])
        A = sum(a.T @ a for a, _ in tokens[l.name]) / max(rows, 1)
        G = sum(g.T @ g for _, g in tokens[l.name]) / len(TRAIN)
        if method == "kfac":
            damp = lambda M: M + (0.1 * torch.diagonal(M).mean() or 1.0) * torch.eye(len(M), dtype=M.dtype)  # noqa: E731
            H = torch.kron(damp(G), damp(A))
        else:
            K = torch.kron(torch.linalg.eigh(G).eigenvectors, torch.linalg.eigh(A).eigenvectors)
            lam = ((gt @ K) ** 2).mean(0)
            H = K @ torch.diag(lam + (0.1 * lam.mean() or 1.0)) @ K.T
        out = out + gq @ torch.linalg.solve(H, gt.T)
    return out


ARCHS = ("mixtral", "qwen2_moe", "gpt_oss")


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_factors_equal_brute_force_sums_over_routed_tokens(arch):
    model, layers, tokens, _, Gt = case(arch)
    cfg = ProjectionConfig(include=INCLUDE)
    factors = fit_kfac(model, batches_of(TRAIN, 4, "left"), method="kfac", config=cfg)
    start = 0
    for l in layers:
        rows = sum(len(a) for a, _ in tokens[l.name])
        A = sum(a.T @ a for a, _ in tokens[l.name]) / max(rows, 1)
        G = sum(g.T @ g for _, g in tokens[l.name]) / len(TRAIN)
        for C, side in ((A, "A"), (G, "G")):
            Q, e = factors.stats[f"{l.name}.Q_{side}"], factors.stats[f"{l.name}.e_{side}"]
            assert close(Q @ torch.diag(e) @ Q.T, C, 1e-12), (l.name, side)
        # the recorded tokens are the ones autograd's per-example gradients come from
        n = l.d_out * (l.d_in + int(l.bias))
        per_example = torch.stack([(g.T @ a).flatten() for a, g in tokens[l.name]])
        assert close(per_example, Gt[:, start : start + n], 1e-12), l.name
        start += n
    experts = [l for l in layers if l.routed]
    assert len(experts) == 2 * 2 * E
    if arch == "gpt_oss":  # the expert no token reaches: zero factors
        assert not any(len(a) for a, _ in tokens[experts[-1].name])
        assert not factors.stats[f"{experts[-1].name}.e_A"].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_kfac_and_ekfac_scores_equal_dense_reference(arch):
    model = case(arch)[0]
    cfg = ProjectionConfig(include=INCLUDE)
    for method in ("kfac", "ekfac"):
        ref = dense_reference(arch, method)
        for product, side in (("dense", "left"), ("ghost", "right")):
            out = kfac_scores(
                model,
                batches_of(QUERIES, 2, side),
                batches_of(TRAIN, 4, "left"),
                method=method,
                config=cfg,
                product=product,
            )
            assert out.shape == (3, 6) and rel_err(out, ref) <= TOL64, (method, product)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_fitted_normaliser_of_experts_equals_brute_force(arch):
    """r = mean_i row sums of g_i * g_i, c = mean_i column sums, g_i the autograd gradients."""
    model, layers, _, _, Gt = case(arch)
    cfg = ProjectionConfig(include=INCLUDE)
    fits = [
        Normalizer.fit(model, batches_of(TRAIN, 4, side), cfg, method=m)
        for m, side in (("ghost", "left"), ("dense", "right"))
    ]
    start = 0
    for l in layers:
        n = l.d_out * (l.d_in + int(l.bias))
        sq = Gt[:, start : start + n].view(-1, l.d_out, l.d_in + int(l.bias)).square()
        start += n
        for norm in fits:
            r, c = norm.factors[l.name]
            assert close(r, sq.sum(2).mean(0), 1e-12) and close(c, sq.sum(1).mean(0), 1e-12), l.name


def _per_layer(G: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    out, col = {}, 0
    for l in layers:
        d_in = l.d_in + int(l.bias)
        out[l.name] = G[:, col : col + l.d_out * d_in].reshape(-1, l.d_out, d_in)
        col += l.d_out * d_in
    return out


def _normalised(grads: dict, norm: Normalizer) -> dict:
    """g / sqrt(r c^T / sum r) per layer, formed densely (eps only: damping_ratio 0)."""
    out = {}
    for name, g in grads.items():
        r, c = (t + norm.eps for t in norm.factors[name])
        out[name] = g / (torch.outer(r, c) / r.sum()).sqrt()
    return out


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_flat_and_normalised_features_of_experts_equal_reference(arch):
    """Flat mode sketches the whole per-example gradient (experts included) with the implicit JL
    matrix; a fitted normaliser scales each expert's gradient, in factorised and flat features."""
    from fastinfluence import GradientExtractor, ops
    from fastinfluence.projection import layer_projections

    model, layers, _, _, Gt = case(arch)
    grads = _per_layer(Gt, layers)
    norm = Normalizer.fit(model, batches_of(TRAIN, 4, "left"), ProjectionConfig(include=INCLUDE))
    normalised = _normalised(grads, norm)
    for normalizer, g in ((None, grads), (norm, normalised)):
        flat = ProjectionConfig(include=INCLUDE, mode="flat", dim=48, seed=3, dtype="float64")
        feats = GradientExtractor(model, flat, normalizer=normalizer).extract(batches_of(TRAIN, 4, "left"))
        ref = ops.jl_project(torch.cat([g[l.name].flatten(1) for l in layers], 1), 48, seed=3, kind=flat.kind)
        assert rel_err(feats.data, ref) <= 1e-10
    cfg = ProjectionConfig(include=INCLUDE, rank_in=5, rank_out=4, dtype="float64")
    feats = GradientExtractor(model, cfg, normalizer=norm).extract(batches_of(TRAIN, 4))
    parts = []
    for l in layers:
        P_in, P_out = (P.double() for P in layer_projections(l, cfg))
        parts.append((P_out.T @ normalised[l.name] @ P_in).flatten(1))
    assert rel_err(feats.data, torch.cat(parts, 1)) <= 1e-10


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_normaliser_from_adam_state_equals_manual(arch):
    """Slice e of the fused parameter's exp_avg_sq (transposed where stored (E, d_in, d_out)), its
    bias's slice as the extra column; live optimizer and state_dict alike."""
    import copy

    from helpers import collate

    model = moe_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model.train()
    for s in range(2):
        b = collate(TRAIN[2 * s : 2 * s + 2])
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    cfg = ProjectionConfig(include=[r"\.experts\.\d+\."])
    live = Normalizer.from_optimizer(model, opt, cfg)
    saved = Normalizer.from_optimizer(model, copy.deepcopy(opt.state_dict()), cfg)
    correction = 1 - 0.95**2
    layers = select_layers(model, cfg.include)
    assert len(layers) == 2 * 2 * E
    for l in layers:
        v = opt.state[l.parameter]["exp_avg_sq"][l.expert] / correction
        v = v.T if l.module.is_transposed else v
        if l.bias:
            v_b = opt.state[getattr(l.module, l.param + "_bias")]["exp_avg_sq"][l.expert] / correction
            v = torch.cat([v, v_b[:, None]], 1)
        for norm in (live, saved):
            # zeros for gpt-oss's expert that no token reaches
            assert close(norm.factors[l.name][0], v.sum(1), 1e-12) and close(norm.factors[l.name][1], v.sum(0), 1e-12)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_exact_scores_of_normalised_expert_gradients_equal_reference(arch):
    """exact_scores(normalizer=): each expert's routed factors scaled as the normaliser scales its
    gradient (gpt-oss: the bias column too), ghost and dense, dot and cosine, against the dense
    products of the normalised per-example gradients."""
    from fastinfluence import exact_scores

    model, layers, _, Gq, Gt = case(arch)
    norm = Normalizer.fit(model, batches_of(TRAIN, 4, "left"), ProjectionConfig(include=INCLUDE))
    q = torch.cat([g.flatten(1) for g in _normalised(_per_layer(Gq, layers), norm).values()], 1)
    t = torch.cat([g.flatten(1) for g in _normalised(_per_layer(Gt, layers), norm).values()], 1)
    dot = q @ t.T
    cosine = dot / q.norm(dim=1)[:, None] / t.norm(dim=1)[None, :]
    cfg = ProjectionConfig(include=INCLUDE)
    for method in ("ghost", "dense"):
        for metric, ref in (("dot", dot), ("cosine", cosine)):
            got = exact_scores(
                model, batches_of(QUERIES, 2), batches_of(TRAIN, 4, "left"), cfg, metric, method, normalizer=norm
            )
            assert rel_err(got, ref) <= TOL64, (method, metric)
