"""Optimizer-aware normalisation: features of g / sqrt(V) (V ~ r c^T / sum r) equal a dense reference.

References are built from slow per-example gradients (one backward per unpadded example, in
float64): the normalised gradient diag(s_out) g diag(s_in) is formed densely and projected with
the extractor's own (unscaled) matrices; fitted factors are the mean row / column sums of g∘g;
optimizer factors are read off the optimizer's state by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import batches_of, collate, make_examples, one_thread, rel_err, slow_gradients, small_model, tiny_model
from helpers import small_examples as examples

from fastinfluence import GradientExtractor, InfluenceCallback, Normalizer, ProjectionConfig, exact_scores, ops, score
from fastinfluence.projection import layer_projections
from fastinfluence.store import MismatchError

# float64 throughout: fast paths and references differ only in summation order (~1e-15).
TOL64 = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def per_layer(slow, layers):
    """layer name -> (N, d_out, d_in') slices of slow (N, P) gradients."""
    out, col = {}, 0
    for l in layers:
        d_in = l.d_in + int(l.bias)
        out[l.name] = slow[:, col : col + l.d_out * d_in].reshape(-1, l.d_out, d_in)
        col += l.d_out * d_in
    return out


def random_normalizer(layers, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.05  # noqa: E731
    return Normalizer({l.name: (rand(l.d_out), rand(l.d_in + int(l.bias))) for l in layers}, **kw)


def dense_normalised(grads, norm):
    """g / sqrt(r c^T / sum r) per layer, formed densely, with damping as the class states."""
    out = {}
    for name, g in grads.items():
        r, c = norm.factors[name]
        r = r + norm.damping_ratio * r.mean() + norm.eps
        c = c + norm.damping_ratio * c.mean() + norm.eps
        out[name] = g / (torch.outer(r, c) / r.sum()).sqrt()
    return out


def projected(grads, layers, config):
    parts = []
    for l in layers:
        P_in, P_out = (P.double() for P in layer_projections(l, config))
        parts.append((P_out.T @ grads[l.name] @ P_in).flatten(1))
    return torch.cat(parts, 1)


CASES = {
    "linear_bias": lambda: (small_model("llama_bias"), examples(5, 7)),
    "gpt2_conv1d": lambda: (tiny_model("gpt2", torch.float64), make_examples(5, seed=7)),
    "lora": lambda: (tiny_model("llama", torch.float64, lora=True), make_examples(5, seed=7)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("damping_ratio", [0.0, 0.3])
def test_features_equal_projected_dense_normalised_gradients(case, damping_ratio):
    model, exs = CASES[case]()
    cfg = ProjectionConfig(rank_in=7, rank_out=5, dtype="float64", seed=3)
    slow, layers = slow_gradients(model, exs)
    norm = random_normalizer(layers, damping_ratio=damping_ratio)
    ex = GradientExtractor(model, cfg, normalizer=norm)
    feats = ex.extract(batches_of(exs, 3, "left"))
    ref = projected(dense_normalised(per_layer(slow, layers), norm), layers, cfg)
    assert rel_err(feats.data, ref) <= TOL64
    assert torch.allclose(feats.norms.double(), ref.norm(dim=1), rtol=1e-6)  # norms: float32
    # the scale is exact, not a no-op: without it the features differ
    plain = GradientExtractor(model, cfg).extract(batches_of(exs, 3, "left"))
    assert rel_err(plain.data, ref) > 0.05


def test_float32_model_tracks_float64():
    """A float32 model's normalised features and fitted factors follow its float64 twin to float32 rounding
    (measured ~2e-7 relative for both; bound 1e-5)."""
    model64, exs = small_model("llama_bias"), examples(5, 11)
    model32 = copy.deepcopy(model64).float()
    cfg = ProjectionConfig(rank_in=7, rank_out=5, include=[r"mlp\.", r"o_proj"])
    fit64 = Normalizer.fit(model64, batches_of(exs, 3), cfg)
    fit32 = Normalizer.fit(model32, batches_of(exs, 3), cfg)
    for name, (r, c) in fit64.factors.items():
        assert rel_err(fit32.factors[name][0], r) <= 1e-5 and rel_err(fit32.factors[name][1], c) <= 1e-5
    f64 = GradientExtractor(model64, cfg, normalizer=fit64).extract(batches_of(exs, 3))
    f32 = GradientExtractor(model32, cfg, normalizer=fit64).extract(batches_of(exs, 3))
    assert f32.data.dtype == torch.float32 and rel_err(f32.data, f64.data) <= 1e-5


def test_token_factors_covariances_and_lm_head_path():
    """Every projection path of the extractor sees the folded scales: per-token factors sum to the
    features, and the backward-free LM-head path equals the dense reference."""
    model, exs = small_model("llama_bias"), examples(4, 9)
    cfg = ProjectionConfig(rank_in=6, rank_out=5, dtype="float64")
    slow, layers = slow_gradients(model, exs)
    norm = random_normalizer(layers, seed=1)
    feats = GradientExtractor(model, cfg, normalizer=norm).extract(batches_of(exs, 2), tokens=True, covariances=True)
    ref = projected(dense_normalised(per_layer(slow, layers), norm), layers, cfg)
    assert rel_err(feats.data, ref) <= TOL64
    name, sl = next(iter(feats.layout.items()))
    a, g = feats.token_factors(0)
    assert rel_err((g[name].T.double() @ a[name].double()).flatten(), feats.data[0, sl.start : sl.stop]) <= TOL64

    head = ProjectionConfig(rank_in=6, rank_out=5, dtype="float64", include=["lm_head"])
    h_slow, h_layers = slow_gradients(model, exs, include=["lm_head"])
    h_norm = random_normalizer(h_layers, seed=2)
    ext = GradientExtractor(model, head, normalizer=h_norm)
    assert ext.capture.fused is not None and ext.capture.head_layer is not None  # the fused head path under test
    h_ref = projected(dense_normalised(per_layer(h_slow, h_layers), h_norm), h_layers, head)
    assert rel_err(ext.extract(batches_of(exs, 2)).data, h_ref) <= TOL64


def test_flat_mode_sketches_the_normalised_gradient():
    model, exs = tiny_model("llama", torch.float64, lora=True), make_examples(4, seed=15)
    slow, layers = slow_gradients(model, exs)
    norm = random_normalizer(layers)
    cfg = ProjectionConfig(mode="flat", dim=64, seed=5, dtype="float64")
    feats = GradientExtractor(model, cfg, normalizer=norm).extract(batches_of(exs, 3, "left"))
    dense = dense_normalised(per_layer(slow, layers), norm)
    ref = ops.jl_project(torch.cat([dense[l.name].flatten(1) for l in layers], 1), 64, seed=5, kind=cfg.kind)
    assert rel_err(feats.data, ref) <= TOL64


@pytest.mark.parametrize("method", ["ghost", "dense"])
def test_exact_scores_of_normalised_gradients(method):
    model = small_model("llama_bias")
    queries, train = examples(3, 1), examples(5, 2)
    slow_q, layers = slow_gradients(model, queries)
    slow_t, _ = slow_gradients(model, train)
    norm = random_normalizer(layers, seed=4)
    nq = dense_normalised(per_layer(slow_q, layers), norm)
    nt = dense_normalised(per_layer(slow_t, layers), norm)
    flat = lambda d: torch.cat([d[l.name].flatten(1) for l in layers], 1)  # noqa: E731
    ref = flat(nq) @ flat(nt).T
    got = exact_scores(model, batches_of(queries, 2), batches_of(train, 3, "left"), method=method, normalizer=norm)
    assert rel_err(got, ref) <= TOL64
    cos = exact_scores(model, batches_of(queries, 2), batches_of(train, 3), metric="cosine", normalizer=norm)
    ref_cos = ref / flat(nq).norm(dim=1)[:, None] / flat(nt).norm(dim=1)[None, :]
    assert rel_err(cos, ref_cos) <= TOL64


@pytest.mark.parametrize("case", ["linear_bias", "gpt2_conv1d", "lora"])
@pytest.mark.parametrize("method", ["ghost", "dense"])
def test_fitted_factors_equal_brute_force(case, method):
    model, exs = CASES[case]()
    slow, layers = slow_gradients(model, exs)
    norm = Normalizer.fit(model, batches_of(exs, 2, "left"), method=method)
    assert norm.source == "fitted" and set(norm.factors) == {l.name for l in layers}
    for name, g in per_layer(slow, layers).items():
        r, c = norm.factors[name]
        assert rel_err(r, (g * g).sum(2).mean(0)) <= TOL64, name
        assert rel_err(c, (g * g).sum(1).mean(0)) <= TOL64, name


def _adam_steps(model, opt, exs, steps=2):
    model.train()
    for s in range(steps):
        b = collate(exs[2 * s : 2 * s + 2])
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


def _manual_factors(layer, v_w, v_b):
    v = v_w if isinstance(layer.module, torch.nn.Linear) else v_w.T
    if v_b is not None:
        v = torch.cat([v, v_b[:, None]], 1)
    return v.sum(1), v.sum(0)


@pytest.mark.parametrize("arch", ["llama_bias", "gpt2", "lora"])
def test_adam_state_factors_equal_manual(arch):
    """Live optimizer and its state_dict (mapped by the model's trainable-parameter order) alike."""
    model = {
        "llama_bias": lambda: small_model("llama_bias"),
        "gpt2": lambda: tiny_model("gpt2", torch.float64),
        "lora": lambda: tiny_model("llama", torch.float64, lora=True),
    }[arch]()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    _adam_steps(model, opt, examples(4, 3, 23 if arch == "llama_bias" else 64))
    cfg = ProjectionConfig(include=None if arch == "lora" else [r"mlp\.", r"attn"])
    live = Normalizer.from_optimizer(model, opt, cfg)
    saved = Normalizer.from_optimizer(model, copy.deepcopy(opt.state_dict()), cfg)
    assert live.source == "adam" and live.factors.keys() == saved.factors.keys()
    ex = GradientExtractor(model, cfg)
    correction = 1 - 0.95**2
    for layer in ex.layers:
        v_b = opt.state[layer.module.bias]["exp_avg_sq"] / correction if layer.bias else None
        r, c = _manual_factors(layer, opt.state[layer.module.weight]["exp_avg_sq"] / correction, v_b)
        for norm in (live, saved):
            assert rel_err(norm.factors[layer.name][0], r) <= 1e-12
            assert rel_err(norm.factors[layer.name][1], c) <= 1e-12


def test_named_parameter_groups_and_adafactor_state():
    model = tiny_model("gpt2", torch.float64)
    decay = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
    other = [(n, p) for n, p in model.named_parameters() if p.dim() <= 1]
    # groups in another order than the model's: only the names say which state is whose
    opt = torch.optim.AdamW([{"params": other, "weight_decay": 0.0}, {"params": decay}], lr=1e-3)
    _adam_steps(model, opt, make_examples(4, seed=2))
    cfg = ProjectionConfig(include=[r"mlp\.c_fc"])
    state = copy.deepcopy(opt.state_dict())
    name = "transformer.h.0.mlp.c_fc"
    saved, live = (torch.cat(Normalizer.from_optimizer(model, o, cfg).factors[name]) for o in (state, opt))
    assert rel_err(saved, live) <= 1e-14

    model = tiny_model("gpt2", torch.float64)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    _adam_steps(model, opt, make_examples(4, seed=2))
    norm = Normalizer.from_optimizer(model, opt, cfg)
    assert norm.source == "adafactor"
    layer = GradientExtractor(model, cfg).layers[0]
    st = opt.state[layer.module.weight]
    d_in, d_out = layer.module.weight.shape  # Conv1D: (d_in, d_out); row_var: (d_in, 1), col_var: (1, d_out)
    r = st["col_var"].reshape(-1) * d_in + opt.state[layer.module.bias]["variance"]
    c = torch.cat([st["row_var"].reshape(-1) * d_out, opt.state[layer.module.bias]["variance"].sum().reshape(1)])
    assert rel_err(norm.factors[layer.name][0], r) <= 1e-12 and rel_err(norm.factors[layer.name][1], c) <= 1e-12


def test_trainer_checkpoint_optimizer_state(tmp_path):
    """A Trainer's optimizer.pt (decay group first, no names) maps with param_names='trainer'."""
    from transformers import Trainer, TrainingArguments

    model, exs = small_model("llama_bias"), examples(4, 3)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(exs)

        def __getitem__(self, i):
            return {"input_ids": exs[i][0], "labels": exs[i][1]}

    def collator(items):
        return collate([(it["input_ids"], it["labels"]) for it in items])

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, save_strategy="steps", save_steps=2,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Data(), data_collator=collator)
    trainer.train()
    state = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)  # no pickle code runs
    cfg = ProjectionConfig(include=[r"mlp\.", r"o_proj"])
    live = Normalizer.from_optimizer(model, trainer.optimizer, cfg)
    saved = Normalizer.from_optimizer(model, state, cfg, param_names="trainer")
    for name, (r, c) in live.factors.items():
        assert rel_err(saved.factors[name][0], r) <= 1e-14 and rel_err(saved.factors[name][1], c) <= 1e-14
    with pytest.raises(ValueError, match="param_names='trainer'"):  # model order: biases are elsewhere
        Normalizer.from_optimizer(model, state, cfg)


def test_transformers_adafactor_state():
    """transformers' Adafactor: row / column means of a Linear weight (not transposed), bias exp_avg_sq."""
    from transformers.optimization import Adafactor

    model = small_model("llama_bias")
    opt = Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False)
    _adam_steps(model, opt, examples(4, 3))
    cfg = ProjectionConfig(include=[r"mlp\.down_proj"])
    norm = Normalizer.from_optimizer(model, opt, cfg)
    layer = GradientExtractor(model, cfg).layers[0]
    st, v_b = opt.state[layer.module.weight], opt.state[layer.module.bias]["exp_avg_sq"]
    r = st["exp_avg_sq_row"] * layer.d_in + v_b
    c = torch.cat([st["exp_avg_sq_col"] * layer.d_out, v_b.sum().reshape(1)])
    assert norm.source == "adafactor"
    assert rel_err(norm.factors[layer.name][0], r) <= 1e-12 and rel_err(norm.factors[layer.name][1], c) <= 1e-12


def test_callback_features_use_the_normalizer(tmp_path):
    """The training callback folds the same scales: its rows equal normalised post-hoc extraction."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fastinfluence import FeatureStore
    from fastinfluence.callback import interval_stores

    model = tiny_model("gpt2", torch.float64)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    exs = make_examples(4, seed=3)
    cfg = ProjectionConfig(rank_in=6, rank_out=6, dtype="float64", include=[r"mlp\."])
    norm = random_normalizer(GradientExtractor(model, cfg).layers)

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.weights = copy.deepcopy(model.state_dict())

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(exs)

        def __getitem__(self, i):
            return {"input_ids": exs[i][0], "labels": exs[i][1], "id": i}

    def collator(items):
        b = collate([(it["input_ids"], it["labels"]) for it in items])
        b["id"] = torch.tensor([it["id"] for it in items])
        return b

    snap = Snapshot()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, remove_unused_columns=False, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    callback = InfluenceCallback(tmp_path / "f", cfg, every=1, normalizer=norm)
    Trainer(model=model, args=args, train_dataset=Data(), data_collator=collator, callbacks=[snap, callback]).train()
    store = FeatureStore.open(interval_stores(tmp_path / "f")[0])
    model.load_state_dict(snap.weights)
    ref = GradientExtractor(model, cfg, normalizer=norm).extract([collate([exs[i]], ids=[i]) for i in store.ids])
    # HF's training loss takes its cross-entropy in float32
    assert rel_err(store.to_features().data, ref.data) < 1e-6
    assert store.fingerprint["normalizer"] == ref.fingerprint["normalizer"]


def test_saved_normalizer_round_trip_and_fingerprint(tmp_path):
    model, exs = small_model("llama_bias"), examples(4, 5)
    cfg = ProjectionConfig(rank_in=6, rank_out=5, dtype="float64", include=[r"mlp\."])
    norm = Normalizer.fit(model, batches_of(exs, 2), cfg, damping_ratio=0.1)
    norm.save(tmp_path / "moments.safetensors")
    again = Normalizer.load(tmp_path / "moments.safetensors")
    assert (again.source, again.eps, again.damping_ratio) == ("fitted", 1e-30, 0.1)
    assert repr(again) == "Normalizer(source='fitted', layers=3, eps=1e-30, damping_ratio=0.1)"
    a = GradientExtractor(model, cfg, normalizer=norm).extract(batches_of(exs, 2))
    b = GradientExtractor(model, cfg, normalizer=str(tmp_path / "moments.safetensors")).extract(batches_of(exs, 2))
    assert torch.equal(a.data, b.data) and a.fingerprint == b.fingerprint
    plain = GradientExtractor(model, cfg).extract(batches_of(exs, 2))
    assert "normalizer" in a.fingerprint and "normalizer" not in plain.fingerprint
    with pytest.raises(MismatchError, match="different gradient normalizer"):
        score(plain, a)
    changed = GradientExtractor(model, cfg, normalizer=Normalizer.fit(model, batches_of(exs[:2], 2), cfg))
    with pytest.raises(MismatchError, match=r"different gradient normalizer .*: fingerprint\['normalizer'\] is '"):
        score(changed.extract(batches_of(exs, 2)), a)
    other = GradientExtractor(model, cfg, normalizer=Normalizer.load(tmp_path / "moments.safetensors", eps=1e-6))
    assert other.fingerprint["normalizer"] != a.fingerprint["normalizer"]


def test_bad_inputs_raise_one_clear_line(tmp_path):
    model = small_model("llama_bias")
    cfg = ProjectionConfig(include=[r"mlp\."])
    layers = GradientExtractor(model, cfg).layers
    norm = random_normalizer(layers)
    l0 = layers[0]
    r, c = norm.factors[l0.name]
    cases = [
        (lambda: GradientExtractor(model, ProjectionConfig(include=["q_proj"]), normalizer=norm), "no factors for"),
        (lambda: GradientExtractor(model, ProjectionConfig(include=[r"mlp\."], include_bias=False), normalizer=norm),
         "include_bias"),
        (lambda: Normalizer({l0.name: (-r, c)}), "negative"),
        (lambda: Normalizer({l0.name: (r.reshape(1, -1), c)}), "1-D"),
        (lambda: Normalizer({l0.name: (torch.zeros_like(r), c)}, eps=0.0), "eps > 0"),
        (lambda: Normalizer({l0.name: (r, c)}, damping_ratio=-1.0), "damping_ratio"),
        (lambda: Normalizer({}), "none"),
        (lambda: Normalizer({l0.name: (r, c)}, source="sgd"), "source"),
        (lambda: GradientExtractor(model, cfg, normalizer={"x": 1}), "Normalizer or the path"),
        (lambda: Normalizer.load(tmp_path / "missing.safetensors"), "no normalizer at"),
        (lambda: Normalizer.fit(model, batches_of(examples(2, 1), 2), cfg, method="fast"), "method"),
        (lambda: Normalizer.from_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg), "never stepped"),
        (lambda: Normalizer.from_optimizer(model, {"lr": 1}, cfg), "state_dict"),
        (lambda: InfluenceCallback(tmp_path / "f", cfg, features=("gradient", "adam"), normalizer=norm),
         "'adam' features"),
    ]  # fmt: skip
    for make, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
            make()
        assert "\n" not in str(err.value)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _adam_steps(model, opt, examples(4, 3))
    state = opt.state_dict()
    names = [n for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match="param_names"):  # state covers fewer parameters than the model trains
        Normalizer.from_optimizer(model, {"state": state["state"], "param_groups": [{"params": [0, 1]}]}, cfg)
    with pytest.raises(ValueError, match="shape"):  # same count, wrong order
        Normalizer.from_optimizer(model, state, cfg, param_names=names[::-1])
    with pytest.raises(ValueError, match="not in the model"):
        Normalizer.from_optimizer(model, state, cfg, param_names=["x"] * len(names))
    frozen = torch.optim.AdamW([p for n, p in model.named_parameters() if "mlp" not in n], lr=1e-3)
    _adam_steps(model, frozen, examples(4, 3))
    with pytest.raises(ValueError, match="no state for"):
        Normalizer.from_optimizer(model, frozen, cfg)
    with pytest.raises(ValueError, match="include_bias=False"):
        bias_free = torch.optim.Adafactor([p for p in model.parameters() if p.dim() > 1], lr=1e-2)
        _adam_steps(model, bias_free, examples(4, 3))
        Normalizer.from_optimizer(model, bias_free, cfg)


def test_a_normalizer_made_on_another_model_is_refused():
    cfg = ProjectionConfig(include=[r"mlp\."])
    norm = Normalizer.fit(tiny_model("llama", seed=0), batches_of(make_examples(2, seed=1), 2), cfg)
    with pytest.raises(ValueError, match="the normalizer was made on another model: the weights of layer") as err:
        GradientExtractor(tiny_model("llama", seed=1), cfg, normalizer=norm)
    assert "\n" not in str(err.value)


def test_a_normalizer_accepts_its_model_cast_to_bfloat16(tmp_path):
    cfg = ProjectionConfig(include=[r"mlp\."])
    model = tiny_model("llama", seed=0)
    Normalizer.fit(model, batches_of(make_examples(2, seed=1), 2), cfg).save(tmp_path / "n.safetensors")
    ex = GradientExtractor(model.to(torch.bfloat16), cfg, normalizer=Normalizer.load(tmp_path / "n.safetensors"))
    assert ex.normalizer.weight_samples.keys() == {l.name for l in ex.layers}


def test_a_normalizer_saved_without_its_model_is_used_with_one_warning(tmp_path, caplog):
    layers = GradientExtractor(tiny_model("llama"), ProjectionConfig(include=[r"mlp\."])).layers
    random_normalizer(layers).save(tmp_path / "old.safetensors")  # as older versions saved every normalizer
    caplog.set_level("WARNING", logger="fastinfluence")
    norm = Normalizer.load(tmp_path / "old.safetensors")
    GradientExtractor(tiny_model("llama", seed=1), ProjectionConfig(include=[r"mlp\."]), normalizer=norm)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "records no weights of the model it was made on" in warned[0]


def test_no_code_of_the_project_unpickles_with_weights_only_false():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    unsafe = re.compile(r"weights_only\s*=\s*False")
    found = [
        str(p.relative_to(root))
        for d in ("fastinfluence", "tests", "bench")
        for p in sorted((root / d).rglob("*.py"))
        if unsafe.search(p.read_text())
    ]
    assert found == []
