"""Per-token scores with MoE experts: each train token's share, summed over every captured layer
(attention, routers, shared experts, each expert's fused-parameter slice, the head), equals the
share taken the slow way.

The reference is written here, independent of the capture: one example at a time through the
model's own forward, in which every captured weight W is replaced at each token t by W + D_t
(D_t = 0, a leaf of its own): ``torch.autograd.grad`` of the example's loss w.r.t. D_t is then
token t's share of grad W, and the shares add up to the per-example gradient
(``test_moe.reference_gradients``). An expert's D_t is one per (token, expert); the experts
module runs a plain per-(token, slot) loop written here with the module's own weights and gate.
A token's share of an expert it was not routed to is zero.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import collate, one_thread, rel_err
from test_moe import QUERIES, TOL64, TRAIN, _features_reference, moe_model, reference_gradients
from torch.overrides import TorchFunctionMode

from fastinfluence import GradientExtractor, ProjectionConfig
from fastinfluence.features import Features
from fastinfluence.lm import IGNORE_INDEX
from fastinfluence.projection import layer_projections
from fastinfluence.scoring import score, token_scores
from fastinfluence.store import write_store


class _PerTokenLinear(TorchFunctionMode):
    """Adds D_t x_t to the output of the ``F.linear`` call whose weight has ``shape`` (one per module);
    D_t's last column multiplies a 1 where the layer's bias is captured."""

    def __init__(self, shape: torch.Size, delta: torch.Tensor):
        super().__init__()
        self.shape, self.delta = shape, delta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and args[1].shape == self.shape:
            x = args[0].reshape(-1, self.shape[1]).double()
            if self.delta.shape[-1] > self.shape[1]:  # [D_W | D_b]
                x = torch.cat([x, x.new_ones(len(x), 1)], 1)
            out = out + torch.einsum("toi,ti->to", self.delta, x).reshape(out.shape).to(out.dtype)
        return out


def _linear_forward(module, delta):
    original = module.forward

    def forward(*args, **kwargs):
        with _PerTokenLinear(module.weight.shape, delta):
            return original(*args, **kwargs)

    return forward


def _experts_forward(experts, deltas):
    """The experts' output, (token, slot) by (token, slot): W_e + D[t, e] for each fused parameter
    (and b_e + its D's last column where the experts have biases, as gpt-oss's)."""
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"

    def weight(name):  # (E, d_out, d_in)
        w = getattr(experts, name)
        return w.transpose(1, 2) if experts.is_transposed else w

    def through(name, x, index, t):  # (T, K, d_out): x (T, d_in) or (T, K, d_in) through each slot's expert
        W = weight(name)
        d_in, D = W.shape[2], deltas[name][t, index]
        out = torch.einsum("tkoi,tki->tko", W[index] + D[..., :d_in], x.expand(*index.shape, d_in))
        b = getattr(experts, name + "_bias", None)
        return out if b is None else out + b[index] + D[..., d_in]

    def forward(hidden, top_k_index, top_k_weights):
        T, K = top_k_index.shape
        t = torch.arange(T)[:, None].expand(T, K)
        up = through(up_name, hidden[:, None], top_k_index, t)
        h = (experts._apply_gate if experts.has_gate else experts.act_fn)(up.reshape(T * K, -1)).reshape(T, K, -1)
        down = through("down_proj", h, top_k_index, t)
        return (down * top_k_weights[..., None].to(down.dtype)).sum(1).to(hidden.dtype)

    return forward


def per_token_gradients(model, example, layers) -> dict[str, torch.Tensor]:
    """{layer: (T, d_out, d_in)} each token's share of the example's gradient of each layer's weight
    (an expert layer ``<experts>.<e>.<param>``: slice e of the fused parameter)."""
    ids, labels = example
    T = len(ids)
    deltas, patched, experts_deltas = {}, [], {}
    for layer in layers:
        d_in = layer.d_in + int(layer.bias)  # [D_W | D_b] where the bias is captured
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", layer.name)
        if m:
            experts = model.get_submodule(m[1])
            d = experts_deltas.setdefault(m[1], (experts, {}))[1]
            if m[3] not in d:
                E = getattr(experts, m[3]).shape[0]
                d[m[3]] = torch.zeros(T, E, layer.d_out, d_in, dtype=torch.float64, requires_grad=True)
        else:
            module = model.get_submodule(layer.name)
            deltas[layer.name] = torch.zeros(T, layer.d_out, d_in, dtype=torch.float64, requires_grad=True)
            patched.append((module, _linear_forward(module, deltas[layer.name])))
    patched += [(experts, _experts_forward(experts, d)) for experts, d in experts_deltas.values()]
    try:
        for module, forward in patched:
            module.forward = forward
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
        keep = labels[1:] != IGNORE_INDEX
        loss = F.cross_entropy(logits[keep].double(), labels[1:][keep])
        leaves = list(deltas.values()) + [t for _, d in experts_deltas.values() for t in d.values()]
        grads = dict(zip(map(id, leaves), torch.autograd.grad(loss, leaves)))
    finally:
        for module, _ in patched:
            del module.forward
    out = {}
    for layer in layers:
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", layer.name)
        if m:
            out[layer.name] = grads[id(experts_deltas[m[1]][1][m[3]])][:, int(m[2])]
        else:
            out[layer.name] = grads[id(deltas[layer.name])]
    return out


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Relative error in norm at most ``tol`` (zeros must be exact zeros)."""
    return float((out - ref).norm()) <= tol * float(ref.norm())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"])
def test_per_token_scores_with_experts_equal_per_token_autograd_float64(arch, tmp_path):
    """Mixtral, Qwen3-MoE, OLMoE; gpt-oss with biases on its experts, router and attention;
    DeepSeek-V3 with a dense first layer and shared experts; in gpt-oss and DeepSeek-V3 an expert
    no token reaches. Top-2 of 4 experts; train batches padded on the left and on the right."""
    tol = TOL64.get(arch, 1e-10)
    model = moe_model(arch)
    with one_thread():
        ext = GradientExtractor(model, ProjectionConfig(rank_in=6, rank_out=6, dtype="float64"))
        layers, names = ext.layers, [l.name for l in ext.layers]
        batches = [collate(TRAIN[:3], "left"), collate(TRAIN[3:], "right")]
        train = ext.extract(batches, tokens=True)
        store = write_store(tmp_path / "train", ext, batches, tokens=True, shard_rows=2)
        Phi = _features_reference(ext, reference_gradients(model, QUERIES, names))  # the queries' phi, slow way
        query = Features(
            Phi, Phi.norm(dim=1).float(), list(range(len(QUERIES))), ext.layout, ext.config, ext.fingerprint
        )
        rows = list(range(len(TRAIN)))
        fast, stored = token_scores(query, train, rows), token_scores(query, store, rows)
        Gt = reference_gradients(model, TRAIN, names)
        for i, example in enumerate(TRAIN):
            shares = per_token_gradients(model, example, layers)
            # the shares are a decomposition of autograd's per-example gradient
            whole = torch.cat([shares[n].sum(0).flatten() for n in names])
            assert rel_err(whole, Gt[i]) <= tol
            ref = 0
            for layer in layers:
                P_in, P_out = (P.double() for P in layer_projections(layer, ext.config))
                sl = ext.layout[layer.name]
                phi_t = (P_out.T @ shares[layer.name] @ P_in).flatten(1)  # (T, k_out k_in)
                ref = ref + Phi[:, sl.start : sl.stop] @ phi_t.T
            assert fast[i].shape == ref.shape == (len(QUERIES), len(example[0]))
            assert rel_err(fast[i].double(), ref) <= max(tol, 1e-6)  # token_scores hands back float32
            assert torch.equal(stored[i], fast[i])
    # the token scores add up to the scores, token factors to the features
    full = score(query, train, topk=len(TRAIN), aggregates=())
    S = torch.zeros(len(QUERIES), len(TRAIN)).scatter_(1, full.topk_indices, full.topk_values)
    assert rel_err(torch.stack([s.sum(1) for s in fast], 1), S) <= 1e-6
    experts = [l.name for l in layers if l.routed]
    reached = set()
    for i in range(len(TRAIN)):
        a, g = train.token_factors(i)
        T, positions = train.token_positions(i)
        a_s, g_s = store.token_factors(i)
        assert (T, positions.keys()) == (store.token_positions(i)[0], set(experts))
        for n in names:
            sl = ext.layout[n]
            assert _close((g[n].T @ a[n]).flatten(), train.data[i, sl.start : sl.stop], tol)
            assert torch.equal(a_s[n], a[n]) and torch.equal(g_s[n], g[n])
        for n in experts:
            p = positions[n]
            assert torch.equal(store.token_positions(i)[1][n], p)
            assert len(p) == len(a[n]) and (p[1:] > p[:-1]).all() and (p >= 0).all() and (p < T).all()
            reached |= {n} if len(p) else set()
        # each token goes to TOP_K experts of each MoE block: 2 rows per token among its gate_up_proj layers
        counts = torch.zeros(T, dtype=torch.long)
        for n in experts:
            if n.endswith("gate_up_proj") and ".layers.1." in n:
                counts.index_add_(0, positions[n], torch.ones_like(positions[n]))
        assert (counts == 2).all()
    if arch in ("gpt_oss", "deepseek_v3"):  # the last expert: no token reaches it, no row anywhere
        assert not any(n.startswith(experts[-1].rsplit(".", 1)[0] + ".") for n in reached)
        assert len(reached) < len(experts)


class _StopsAfter(GradientExtractor):
    """Raises after computing ``n`` batches, as a kill inside the extraction loop would."""

    n: int | None = None

    def iter_batch_features(self, batches, *args, **kw):
        computed = 0
        for positions, f, closes in super().iter_batch_features(batches, *args, **kw):
            if f is not None and self.n is not None:
                if computed == self.n:
                    raise KeyboardInterrupt
                computed += 1
            yield positions, f, closes


def test_expert_token_scores_sum_to_scores_and_follow_data_order_and_resume(tmp_path):
    """Per-token scores sum to the scores with the cosine, layer normalisation and K-FAC; length-bucketed
    batches (``positions``): the rows come back in data order with their routed rows; a store resumed
    from the part files of a stopped extraction holds the same token factors."""
    model = moe_model("mixtral")
    with one_thread():
        ext = _StopsAfter(model, ProjectionConfig(rank_in=4, rank_out=4, dtype="float64"))
        plain = ext.extract([collate(TRAIN, "left")], tokens=True, covariances=True)
        query = ext.extract([collate(QUERIES, "right")])
        for metric, layer_normalize, precondition in (("cosine", False, None), ("dot", True, "kfac")):
            kw = dict(metric=metric, layer_normalize=layer_normalize, precondition=precondition)
            full = score(query, plain, topk=len(TRAIN), aggregates=(), **kw)
            S = torch.zeros(len(QUERIES), len(TRAIN), dtype=full.topk_values.dtype)
            S.scatter_(1, full.topk_indices, full.topk_values)
            per_token = token_scores(query, plain, range(len(TRAIN)), **kw)
            assert rel_err(torch.stack([s.sum(1) for s in per_token], 1), S) <= 1e-6, metric
        order = [4, 1, 3, 0, 2]
        shuffled = [
            dict(collate([TRAIN[p] for p in order[s : s + 2]], "right"), positions=order[s : s + 2]) for s in (0, 2, 4)
        ]
        bucketed = ext.extract(shuffled, tokens=True)
        ext.n = 2
        with pytest.raises(KeyboardInterrupt):
            write_store(tmp_path / "s", ext, shuffled, tokens=True, shard_rows=100)
        assert len(list((tmp_path / "s" / "shards").glob("part-*.safetensors"))) == 2
        ext.n = None
        store = write_store(tmp_path / "s", ext, shuffled, tokens=True, shard_rows=100)
    for i in range(len(TRAIN)):
        T, positions = plain.token_positions(i)
        (a, g) = plain.token_factors(i)
        for source in (bucketed, store):
            a2, g2 = source.token_factors(i)
            T2, positions2 = source.token_positions(i)
            assert T2 == T and positions2.keys() == positions.keys()
            for n in a:
                assert _close(a2[n], a[n], 1e-12) and _close(g2[n], g[n], 1e-12)
            for n, p in positions.items():
                assert torch.equal(positions2[n], p)


def test_lora_adapters_on_experts_have_a_row_per_routed_token_and_slot():
    """PEFT LoRA on the fused experts: an adapter layer covers every expert, so each token has one
    row per slot (TOP_K); the rows' products add up to the features, the token scores to the scores."""
    peft = pytest.importorskip("peft")
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=targets, init_lora_weights=False)
    model = peft.get_peft_model(moe_model("mixtral"), cfg)
    with one_thread():
        ext = GradientExtractor(model, ProjectionConfig(rank_in=3, rank_out=3, dtype="float64"))
        train = ext.extract([collate(TRAIN[:3], "left"), collate(TRAIN[3:], "right")], tokens=True)
        query = ext.extract([collate(QUERIES)])
    adapters = [l.name for l in ext.layers if l.routed]
    assert len(adapters) == 8
    full = score(query, train, topk=len(TRAIN), aggregates=())
    S = torch.zeros(len(QUERIES), len(TRAIN), dtype=full.topk_values.dtype).scatter_(
        1, full.topk_indices, full.topk_values
    )
    per_token = token_scores(query, train, range(len(TRAIN)))
    assert rel_err(torch.stack([s.sum(1) for s in per_token], 1), S) <= 1e-6
    for i in range(len(TRAIN)):
        a, g = train.token_factors(i)
        T, positions = train.token_positions(i)
        assert positions.keys() == set(adapters)
        for n in adapters:
            assert torch.equal(torch.bincount(positions[n], minlength=T), torch.full((T,), 2))
            sl = ext.layout[n]
            assert _close((g[n].T @ a[n]).flatten(), train.data[i, sl.start : sl.stop], 1e-12)
