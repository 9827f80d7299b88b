"""LESS over InfluenceCallback's Adam stores equals a brute-force reference: per-example gradients by one
backward per example, the Adam moments of each step applied by hand, cosines with query gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import collate, make_examples, slow_gradients, tiny_model
from test_callback import EXAMPLES, _exact, _train
from transformers import Trainer

from fastinfluence import FeatureStore, GradientExtractor, InfluenceCallback, ProjectionConfig
from fastinfluence.callback import interval_stores
from fastinfluence.trajectory import less, tracin

TRAIN = EXAMPLES[:8]
QUERIES = make_examples(3, seed=12)
STEPS, LR, ACC, BATCH = 4, 1e-2, 2, 2
PER_STEP = ACC * BATCH
BETAS, EPS = (0.8, 0.99), 1e-6  # not the defaults, so that the parameter group's values are the ones used


def _gpt2():
    return _exact(tiny_model("gpt2", torch.float64))


def _lora():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True, init_lora_weights=False)
    return _exact(get_peft_model(tiny_model("gpt2", torch.float64), lora).double())


CASES = {
    # full GPT-2 (Conv1D weights stored transposed, biases) with identity projections: exact directions
    "gpt2-exact": (_gpt2, ProjectionConfig(rank_in=160, rank_out=160, dtype="float64")),
    # LoRA adapters with random projections on their wide sides
    "lora-projected": (_lora, ProjectionConfig(rank_in=8, rank_out=8, dtype="float64")),
}


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory):
    """Two epochs of two optimizer steps (batch 2, accumulation 2, sequential, linear decay); a store every 2 steps."""
    build, config = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    model = build()
    callback, snaps = _train(
        model,
        tmp,
        config,
        accumulation=ACC,
        steps=STEPS,
        examples=TRAIN,
        every=2,
        features=("gradient", "adam"),
        train_sampling_strategy="sequential",
        lr_scheduler_type="linear",
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
    )
    final = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = {2: snaps.weights[3], 4: final}
    return tmp / "features", model, config, snaps, checkpoints, callback.extractor


def _layer_parts(model, layers):
    """Per layer: (weight name, bias name or None, stored transposed, rows d_out, cols d_in + bias)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (
            names[id(l.module.weight)],
            names[id(l.module.bias)] if l.bias else None,
            not isinstance(l.module, torch.nn.Linear),
            l.d_out,
            l.d_in + int(l.bias),
        )
        for l in layers
    ]


def _moments(adam: dict, parts, model):
    """(m, v, t): the optimizer's moments before a step in slow_gradients' layout, and the step's number."""
    params = dict(model.named_parameters())
    m, v, steps = [], [], set()
    for weight, bias, transposed, *_ in parts:
        for name, t in ((weight, transposed), (bias, False)):
            if name is None:
                continue
            zero = torch.zeros_like(params[name])
            mp, vp, step = adam.get(name, (zero, zero, 0))
            mp, vp = (mp.T, vp.T) if t else (mp, vp)
            m.append(mp if mp.dim() == 2 else mp[:, None])
            v.append(vp if vp.dim() == 2 else vp[:, None])
            steps.add(step)
    assert len(steps) == 1
    # weight and bias of a layer sit side by side: [W | b] row by row, as slow_gradients lays them out
    out_m, out_v, k = [], [], 0
    for _weight, bias, *_ in parts:
        n = 2 if bias is not None else 1
        out_m.append(torch.cat(m[k : k + n], 1).flatten())
        out_v.append(torch.cat(v[k : k + n], 1).flatten())
        k += n
    return torch.cat(out_m), torch.cat(out_v), steps.pop() + 1


def _project(flat: torch.Tensor, parts, layers, extractor):
    """(N, P) flat per-layer gradients -> (N, D) P_out^T X P_in per layer, by hand."""
    out, k = [], 0
    for (*_, rows, cols), layer in zip(parts, layers):
        X = flat[:, k : k + rows * cols].reshape(-1, rows, cols)
        P_in, P_out = extractor.projections(layer.name, torch.device("cpu"), torch.float64)
        out.append((P_out.T @ X @ P_in).flatten(1))
        k += rows * cols
    return torch.cat(out, 1)


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def test_less_and_tracin_equal_brute_force(run):
    out, model, config, snaps, checkpoints, extractor = run
    queries, lrs, terms = {}, {}, {}
    layers = extractor.layers
    parts = _layer_parts(model, layers)
    projected_queries = {}
    for end, weights in checkpoints.items():
        model.load_state_dict(weights)
        queries[end] = GradientExtractor(model, config).extract([collate(QUERIES)])
        g_q, q_layers = slow_gradients(model, QUERIES)
        assert [l.name for l in q_layers] == [l.name for l in layers]
        projected_queries[end] = _project(g_q, parts, layers, extractor)
    for step in range(1, STEPS + 1):
        q = projected_queries[2 if step <= 2 else 4]  # the interval's checkpoint
        model.load_state_dict(snaps.weights[step])  # the weights step `step` trained with
        first = PER_STEP * (step - 1) % len(TRAIN)
        g, _ = slow_gradients(model, TRAIN[first : first + PER_STEP])
        m, v, t = _moments(snaps.adam[step], parts, model)
        m_hat = (BETAS[0] * m + (1 - BETAS[0]) * g) / (1 - BETAS[0] ** t)
        v_hat = (BETAS[1] * v + (1 - BETAS[1]) * g * g) / (1 - BETAS[1] ** t)
        gamma = _project(m_hat / (v_hat.sqrt() + EPS), parts, layers, extractor)
        lrs[step] = LR * (STEPS - (step - 1)) / STEPS  # the Trainer's linear schedule without warmup
        for name, x in (("less", _unit(q) @ _unit(gamma).T), ("tracin", q @ _project(g, parts, layers, extractor).T)):
            terms[name, step] = torch.zeros(len(QUERIES), len(TRAIN), dtype=torch.float64)
            terms[name, step][:, first : first + PER_STEP] = x
    interval_lr = {s: (lrs[1] + lrs[2]) / 2 if s <= 2 else (lrs[3] + lrs[4]) / 2 for s in lrs}
    assert [p.name for p in interval_stores(out, "adam")] == ["step-00000002", "step-00000004"]
    for name, fn in (("less", less), ("tracin", tracin)):
        for lr, weight in (("step", lrs), ("interval", interval_lr)):
            reference = sum(weight[s] * terms[name, s] for s in lrs)
            score = fn(queries, out, topk=None, lr=lr)
            assert score.train_ids == [100 + i for i in range(len(TRAIN))]
            S = torch.zeros_like(reference)
            S.scatter_(1, score.topk_indices, score.topk_values.double())
            # float64 throughout; results are returned in float32 (relative rounding 6e-8)
            err = (S - reference).abs().max()
            assert torch.allclose(S, reference, rtol=1e-6, atol=1e-6 * reference.abs().max()), (name, lr, err)
    less_ref = sum(lrs[s] * terms["less", s] for s in lrs)
    assert less_ref.abs().max() <= 2 * LR + 1e-12  # a sum of lr-weighted cosines: bounded by the summed rates


def test_less_refuses_gradient_stores(run):
    out, model, config, *_ = run
    q = GradientExtractor(model, config).extract([collate(QUERIES)])
    with pytest.raises(ValueError, match="holds gradient features"):
        less({2: q, 4: q}, interval_stores(out))


def _trainer(tmp_path, callback, model, optimizers=(None, None)):
    from test_callback import _collate, _Dataset, _training_args

    args = _training_args(tmp_path, output_dir=str(tmp_path / "o"), max_steps=1)

    return Trainer(
        model=model,
        args=args,
        train_dataset=_Dataset(EXAMPLES),
        data_collator=_collate,
        callbacks=[callback],
        optimizers=optimizers,
    )


def test_too_large_layer_named_with_the_fix_before_training(tmp_path):
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = InfluenceCallback(
        tmp_path / "f", ProjectionConfig(rank_in=4, rank_out=4), features="adam", dense_limit=1000
    )
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn is 96 x 32.*LoRA.*dense_limit"):
        _trainer(tmp_path, callback, model).train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any step


def test_non_adam_optimizer_refused(tmp_path):
    model = tiny_model("gpt2")
    callback = InfluenceCallback(tmp_path / "f", ProjectionConfig(rank_in=4, rank_out=4), features=("adam",))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="need an Adam or AdamW optimizer.*SGD"):
        _trainer(tmp_path, callback, model, (sgd, None)).train()


def test_unknown_feature_kind_refused():
    with pytest.raises(ValueError, match="features must name some of"):
        InfluenceCallback("unused", ProjectionConfig(), features=("adam", "sign"))


def test_unknown_lr_weighting_refused(run):
    out, model, config, *_ = run
    with pytest.raises(ValueError, match="lr must be 'step'"):
        less({}, out, lr="epoch")


def test_example_without_answer_tokens_has_zero_rows(tmp_path):
    ids, labels = EXAMPLES[1]
    examples = [EXAMPLES[0], (ids, torch.full_like(labels, -100))]
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    _train(_gpt2(), tmp_path, config, accumulation=1, steps=2, examples=examples, features=("gradient", "adam"))
    for kind in ("gradient", "adam"):
        store = FeatureStore.open(interval_stores(tmp_path / "features", kind)[-1])  # step 2: Adam moments are set
        rows = dict(zip(store.ids, store.to_features().data))
        assert torch.count_nonzero(rows[101]) == 0 and torch.count_nonzero(rows[100]) > 0, kind


@pytest.mark.parametrize("chunk", [1, 3 * 7 * 6, 1 << 20])  # example by example, two at a time, the whole batch
def test_adam_rows_equal_the_formula_on_random_inputs(monkeypatch, chunk):
    from fastinfluence import adam, callback

    monkeypatch.setattr(adam, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    B, T, d_in, d_out = 5, 4, 6, 7
    A, G = (
        torch.randn(B, T, d_in, generator=g, dtype=torch.float64),
        torch.randn(B, T, d_out, generator=g, dtype=torch.float64),
    )
    mask = torch.rand(B, T, generator=g) > 0.3
    A[~mask], G[~mask] = float("nan"), float("nan")  # padding never reaches a row
    scale = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    m = torch.randn(d_out, d_in + 1, generator=g, dtype=torch.float64) * 0.1
    v = torch.rand(d_out, d_in + 1, generator=g, dtype=torch.float64) * 0.01
    P_in, P_out = (
        torch.randn(d_in + 1, 3, generator=g, dtype=torch.float64),
        torch.randn(d_out, 2, generator=g, dtype=torch.float64),
    )
    got = callback.adam_rows(A, G, mask, True, scale, (m, v, 3, BETAS, EPS), P_in, P_out)
    for i in range(B):
        a = torch.cat([A[i][mask[i]], torch.ones(int(mask[i].sum()), 1, dtype=torch.float64)], 1)
        grad = scale[i] * G[i][mask[i]].T @ a
        m_hat = (BETAS[0] * m + (1 - BETAS[0]) * grad) / (1 - BETAS[0] ** 3)
        v_hat = (BETAS[1] * v + (1 - BETAS[1]) * grad**2) / (1 - BETAS[1] ** 3)
        ref = P_out.T @ (m_hat / (v_hat.sqrt() + EPS)) @ P_in
        assert torch.allclose(got[i], ref.flatten(), rtol=1e-12, atol=1e-12), i
