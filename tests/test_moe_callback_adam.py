"""InfluenceCallback's Adam rows (LESS) on mixture-of-experts models: every expert, router and
attention layer's row equals the projected Adam step of the example's own gradient, written out
here: per-example gradients from autograd (one backward per example, slices of the fused
parameters), the optimizer's moments at that step sliced per expert by hand, Adam's formula
applied elementwise."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from helpers import one_thread, rel_err
from test_callback import EXAMPLES, _float64_loss, _train
from test_moe import moe_model, reference_gradients

from fastinfluence import FeatureStore, InfluenceCallback, ProjectionConfig
from fastinfluence.callback import interval_stores
from fastinfluence.moe import EXCLUDE_EXPERTS

BETAS, EPS = (0.8, 0.99), 1e-4  # not the defaults: the parameter group's values are the ones used


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread (the default spreads each small op over every core)."""
    with one_thread():
        yield


def _parts(model, name):
    """[(parameter name, its share of layer ``name``'s gradient)]: weight then bias, (d_out, d_in) / (d_out,)."""
    m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", name)
    if m:  # slice e of the fused parameter, transposed where the model stores it (E, d_in, d_out)
        experts, e = model.get_submodule(m[1]), int(m[2])
        t = experts.is_transposed
        out = [(f"{m[1]}.{m[3]}", lambda x: x[e].T if t else x[e])]
        if getattr(experts, m[3] + "_bias", None) is not None:
            out.append((f"{m[1]}.{m[3]}_bias", lambda x: x[e]))
        return out
    module = model.get_submodule(name)
    return [(f"{name}.weight", lambda x: x)] + (
        [(f"{name}.bias", lambda x: x)] if getattr(module, "bias", None) is not None else []
    )


def _adam_step(model, adam: dict, name: str, g: torch.Tensor) -> torch.Tensor:
    """Adam's direction (bias-corrected m / (sqrt(v) + eps)) of gradient ``g`` (d_out, d_in + bias) of layer
    ``name``, from the moments before the step (zeros and step 0 before the first update)."""
    params = dict(model.named_parameters())
    m, v, steps = [], [], set()
    for pname, share in _parts(model, name):
        zero = torch.zeros_like(params[pname])
        mp, vp, step = adam.get(pname, (zero, zero, 0))
        m.append(share(mp).reshape(g.shape[0], -1))
        v.append(share(vp).reshape(g.shape[0], -1))
        steps.add(step)
    (t,) = steps
    t += 1
    m, v = torch.cat(m, 1), torch.cat(v, 1)
    m_hat = (BETAS[0] * m + (1 - BETAS[0]) * g) / (1 - BETAS[0] ** t)
    v_hat = (BETAS[1] * v + (1 - BETAS[1]) * g * g) / (1 - BETAS[1] ** t)
    return m_hat / (v_hat.sqrt() + EPS)


def _lora_on_experts():
    peft = pytest.importorskip("peft")
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=experts, init_lora_weights=False)
    return peft.get_peft_model(moe_model("gpt_oss"), lora)


CASES = {
    # transposed fused experts with biases, a router with a bias, an expert no token reaches
    "gpt_oss": (lambda: moe_model("gpt_oss"), 2 * 4 * 2),
    "mixtral": (lambda: moe_model("mixtral"), 2 * 4 * 2),
    # PEFT LoRA on the fused parameters: lora_A / lora_B fed by every expert's routed tokens
    "gpt_oss-lora": (_lora_on_experts, 2 * 2 * 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adam_rows_of_experts_and_routers_equal_autograd_and_adams_formula(case, tmp_path):
    build, n_routed = CASES[case]
    model = _float64_loss(build())
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    adam = dict(features=("adam",), adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS)
    callback, snaps = _train(model, tmp_path, config, accumulation=2, steps=2, **adam)
    layers = callback.extractor.layers
    assert sum(l.routed for l in layers) == n_routed
    names = [l.name for l in layers]
    by_id = {100 + i: ex for i, ex in enumerate(EXAMPLES)}
    stores = interval_stores(tmp_path / "features", "adam")
    assert [p.name for p in stores] == ["step-00000001", "step-00000002"]  # step 1: zero moments; step 2: set
    for path in stores:
        store = FeatureStore.open(path)
        step = int(path.name.split("-")[1])
        model.load_state_dict(snaps.weights[step])
        got = store.to_features().data.double()
        grads = reference_gradients(model, [by_id[i] for i in store.ids], names)
        want, k = [], 0
        for layer in layers:
            size = layer.d_out * (layer.d_in + int(layer.bias))
            g = grads[:, k : k + size].reshape(-1, layer.d_out, layer.d_in + int(layer.bias))
            gamma = torch.stack([_adam_step(model, snaps.adam[step], layer.name, gi) for gi in g])
            P_in, P_out = callback.extractor.projections(layer.name, torch.device("cpu"), torch.float64)
            want.append((P_out.T @ gamma @ P_in).flatten(1))
            k += size
        want = torch.cat(want, 1)
        assert k == grads.shape[1] and got.shape == want.shape
        # The models' RMSNorm (and Mixtral's routing softmax) compute in float32, so the training
        # batch's gradients and the one-example references differ at ~1e-7 of each example's largest
        # entries, as in test_moe_callback. Adam's step reads an entry g at resolution 1 / eps at
        # worst (step 1, zero moments: g / (|g| + eps)), so EPS = 1e-4 keeps the rounding of the
        # near-zero, cancelling entries (1e-9) at <= 1e-5 (measured <= 5e-6 per layer; with eps
        # 1e-6 the routers' reach 3e-4). A wrong slice, orientation, moment or routed token is O(1).
        for layer in layers:
            sl = callback.extractor.layout[layer.name]
            out, ref = got[:, sl.start : sl.stop], want[:, sl.start : sl.stop]
            if not ref.any():  # gpt-oss's last expert: no token, no moments, no direction
                assert not out.any(), (path.name, layer.name)
                continue
            assert rel_err(out, ref) < 3e-5, (path.name, layer.name, rel_err(out, ref))


@pytest.mark.parametrize("chunk", [1, 3 * 7 * 6, 1 << 20])  # example by example, two at a time, the whole batch
def test_routed_adam_rows_equal_the_formula_on_random_inputs(monkeypatch, chunk):
    from fastinfluence import adam

    monkeypatch.setattr(adam, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(7)
    B, n, d_in, d_out = 5, 13, 6, 7
    A = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    G = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    example = torch.randint(0, B, (n,), generator=g)
    example[example == 2] = 3  # example 2 sends no token to this expert
    example = example[torch.randperm(n, generator=g)]  # in any order
    scale = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    m = torch.randn(d_out, d_in + 1, generator=g, dtype=torch.float64) * 0.1
    v = torch.rand(d_out, d_in + 1, generator=g, dtype=torch.float64) * 0.01
    P_in = torch.randn(d_in + 1, 3, generator=g, dtype=torch.float64)
    P_out = torch.randn(d_out, 2, generator=g, dtype=torch.float64)
    got = adam.adam_rows(A, G, example, True, scale, (m, v, 3, BETAS, EPS), P_in, P_out, routed=True)
    for i in range(B):
        rows = example == i
        grad = scale[i] * G[rows].T @ torch.cat([A[rows], torch.ones(int(rows.sum()), 1, dtype=torch.float64)], 1)
        m_hat = (BETAS[0] * m + (1 - BETAS[0]) * grad) / (1 - BETAS[0] ** 3)
        v_hat = (BETAS[1] * v + (1 - BETAS[1]) * grad**2) / (1 - BETAS[1] ** 3)
        ref = P_out.T @ (m_hat / (v_hat.sqrt() + EPS)) @ P_in
        assert torch.allclose(got[i], ref.flatten(), rtol=1e-12, atol=1e-12), i
    assert got[2].abs().min() > 0  # no token: the momentum's direction, not zero


def test_router_auxiliary_loss_is_refused_even_with_the_experts_excluded(tmp_path):
    """Its gradient reaches every layer below a router through the hidden states, not only the experts."""
    model = moe_model("mixtral")
    model.config.output_router_logits = True
    args, state = SimpleNamespace(gradient_checkpointing=False), SimpleNamespace(max_steps=1, global_step=0)
    for config in (ProjectionConfig(), ProjectionConfig(exclude=[EXCLUDE_EXPERTS, r"mlp\.gate"])):
        callback = InfluenceCallback(tmp_path, config, features=("gradient", "adam"))
        with pytest.raises(ValueError, match=r"^InfluenceCallback .*output_router_logits=True adds the router"):
            callback.on_train_begin(args, state, None, model=model, optimizer=None)
        callback.close()


def test_router_normaliser_from_adam_state_is_in_the_linear_orientation():
    """A router's weight is stored (E, H) = (d_out, d_in), like a Linear's (not transposed like GPT-2's
    Conv1D): its factors are the row and column sums of its exp_avg_sq as stored."""
    from helpers import collate

    from fastinfluence import Normalizer

    model = moe_model("gpt_oss")  # a router with a bias: the extra column
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=BETAS)
    batch = collate(EXAMPLES[:2])
    model(**batch).loss.backward()
    opt.step()
    norm = Normalizer.from_optimizer(model, opt, ProjectionConfig(include=[r"mlp\.router$"]))
    for name in ("model.layers.0.mlp.router", "model.layers.1.mlp.router"):
        router = model.get_submodule(name)
        v = torch.cat([opt.state[router.weight]["exp_avg_sq"], opt.state[router.bias]["exp_avg_sq"][:, None]], 1)
        v = v / (1 - BETAS[1])
        r, c = norm.factors[name]
        assert r.shape == (router.weight.shape[0],) and rel_err(r, v.sum(1)) < 1e-12 and rel_err(c, v.sum(0)) < 1e-12
