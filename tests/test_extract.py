"""GradientExtractor: features equal projected slow gradients, independent of batching; model untouched."""

import math

import pytest
import torch
from helpers import batches_of, collate, make_examples, rel_err, slow_gradients, tiny_model

from fastinfluence import GradientExtractor, ProjectionConfig
from fastinfluence.projection import layer_projections, random_matrix


def projected_reference(extractor, slow):
    """phi_i = P_out^T [grad W_i | grad b_i] P_in per layer, from slow (N, P) gradients."""
    parts, col = [], 0
    for layer in extractor.layers:
        width = layer.d_out * (layer.d_in + int(layer.bias))
        W = slow[:, col : col + width].reshape(-1, layer.d_out, layer.d_in + int(layer.bias))
        col += width
        P_in, P_out = (P.double() for P in layer_projections(layer, extractor.config))
        parts.append((P_out.T @ W @ P_in).flatten(1))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("arch,lora", [("llama", False), ("gpt2", False), ("opt", False), ("llama", True)])
def test_features_equal_projected_slow_gradients(arch, lora):
    model = tiny_model(arch, torch.float64, lora=lora)
    examples = make_examples(5, seed=7)
    cfg = ProjectionConfig(rank_in=16, rank_out=8, dtype="float64")
    ex = GradientExtractor(model, cfg)
    feats = ex.extract(batches_of(examples, 3, "left"))
    slow, _ = slow_gradients(model, examples)
    ref = projected_reference(ex, slow)
    assert feats.data.shape == (5, ex.dim) and feats.ids == list(range(5))
    assert rel_err(feats.data, ref) <= 1e-10
    assert torch.allclose(feats.norms.double(), ref.norm(dim=1), rtol=1e-5)


def test_exact_sides_when_rank_exceeds_width():
    """A side no wider than its rank is the identity: features are the exact gradients."""
    model = tiny_model("llama", torch.float64)
    cfg = ProjectionConfig(rank_in=64, rank_out=64, include=[r"layers\.0\.mlp"], dtype="float64")
    ex = GradientExtractor(model, cfg)
    examples = make_examples(3, seed=8)
    slow, _ = slow_gradients(model, examples, include=cfg.include)
    assert rel_err(ex.extract(batches_of(examples, 3)).data, slow) <= 1e-10


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projection_is_unbiased(kind):
    """Averaged over seeds, <phi_i, phi_j> converges to <grad W_i, grad W_j>.

    One layer (d_out 32 x d_in 48 + bias) projected to k_out x k_in = 8 x 8, two examples
    with cosine -0.08. Expected spread of one estimate, for a flat JL sketch of width
    k = 64: sqrt((<x,y>^2 + |x|^2 |y|^2) / k) = 2.31e-3. Measured over 2000 seeds: std
    3.40e-3 (gaussian, 1.47x flat) and 3.16e-3 (rademacher, 1.37x): the Kronecker product
    of two independent sketches spreads more than one flat sketch of the same width.
    The mean of 2000 estimates lies within 4 standard errors of the exact value (measured
    |error| / (|x| |y|): 3.4e-3 gaussian, 1.2e-3 rademacher).
    """
    model = tiny_model("llama", torch.float64)
    include = [r"layers\.0\.mlp\.down_proj"]
    slow, layers = slow_gradients(model, make_examples(2, seed=9), include=include)
    layer = layers[0]
    W = slow.reshape(2, layer.d_out, layer.d_in + int(layer.bias))
    exact = float((W[0] * W[1]).sum())
    flat_jl_std = math.sqrt((exact**2 + float(W[0].norm() * W[1].norm()) ** 2) / 64)
    est = []
    for seed in range(2000):
        cfg = ProjectionConfig(rank_in=8, rank_out=8, kind=kind, seed=seed)
        P_in, P_out = (P.double() for P in layer_projections(layer, cfg))
        phi = P_out.T @ W @ P_in
        est.append(float((phi[0] * phi[1]).sum()))
    est = torch.tensor(est, dtype=torch.float64)
    sem = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - exact) <= 4 * sem
    assert 1.0 <= float(est.std()) / flat_jl_std <= 2.0


def test_projection_matrices_are_deterministic():
    a = random_matrix(3, "model.layers.0.mlp.up_proj.in", 33, 16, "gaussian")
    assert torch.equal(a, random_matrix(3, "model.layers.0.mlp.up_proj.in", 33, 16, "gaussian"))
    assert not torch.equal(a, random_matrix(4, "model.layers.0.mlp.up_proj.in", 33, 16, "gaussian"))
    assert not torch.equal(a, random_matrix(3, "model.layers.1.mlp.up_proj.in", 33, 16, "gaussian"))
    r = random_matrix(3, "x", 40, 16, "rademacher")
    assert torch.equal(r.abs(), torch.full_like(r, 0.25))
    # E[P P^T] = I: the diagonal of P P^T averages 1.
    assert abs(float((a @ a.T).diagonal().mean()) - 1.0) < 0.3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_features_do_not_depend_on_batching_or_padding(arch):
    model = tiny_model(arch, torch.float32)
    ex = GradientExtractor(model, ProjectionConfig(rank_in=16, rank_out=16))
    examples = make_examples(5, seed=10, min_len=4, max_len=14)
    alone = torch.cat([ex.extract([collate([e])]).data for e in examples])
    for side in ("left", "right"):
        for size in (2, 5):
            together = ex.extract(batches_of(examples, size, side)).data
            # float32: the same sums in different matmul shapes and order.
            assert rel_err(together, alone) <= 1e-4, (side, size)
    reversed_batch = ex.extract([collate(examples[::-1], "left")]).data.flip(0)
    assert rel_err(reversed_batch, alone) <= 1e-4


def test_token_factors_and_covariances():
    model = tiny_model("gpt2", torch.float64)
    ex = GradientExtractor(model, ProjectionConfig(rank_in=16, rank_out=8, dtype="float64"))
    batches = batches_of(make_examples(4, seed=11), 3, "left")
    plain = ex.extract(batches)
    feats = ex.extract(batches, tokens=True, covariances=True)
    assert rel_err(feats.data, plain.data) <= 1e-12
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    assert torch.equal(feats.tokens.offsets, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    for name, sl in ex.layout.items():
        a, g = feats.tokens.a[name], feats.tokens.g[name]
        for i in range(len(feats)):
            rows = slice(int(feats.tokens.offsets[i]), int(feats.tokens.offsets[i + 1]))
            phi = g[rows].T @ a[rows]
            assert rel_err(phi.flatten(), feats.data[i, sl.start : sl.stop]) <= 1e-12
        CA, CG, n = feats.stats[name]
        assert n == int(lengths.sum())
        assert rel_err(CA, a.T @ a) <= 1e-12 and rel_err(CG, g.T @ g) <= 1e-12


def test_ids_storage_dtype_and_skip():
    model = tiny_model("llama")
    ex = GradientExtractor(model, ProjectionConfig(rank_in=8, rank_out=8, dtype="bfloat16"))
    examples = make_examples(5, seed=12)
    batches = [collate(examples[:3], ids=["a", "b", "c"]), collate(examples[3:], ids=["d", "e"])]
    full = ex.extract(batches)
    assert full.data.dtype == torch.bfloat16 and full.ids == ["a", "b", "c", "d", "e"]
    assert torch.allclose(full.norms, full.data.float().norm(dim=1), rtol=1e-2)
    tail = list(ex.iter_features(batches, skip_examples=4))
    assert len(tail) == 1 and tail[0].ids == ["e"]
    assert torch.equal(tail[0].data, full.data[4:])
    mid = list(ex.iter_features(batches, skip_examples=1))
    assert [f.ids for f in mid] == [["b", "c"], ["d", "e"]]


def _snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()
        },
    }


def test_model_is_left_exactly_as_found():
    model = tiny_model("llama", lora=True)
    model.train()
    model.base_model.model.model.layers[1].eval()  # a mixed train/eval state
    params = dict(model.named_parameters())
    lora_b = next(n for n in params if "lora_B" in n)
    params[lora_b].grad = torch.randn_like(params[lora_b])
    params["base_model.model.lm_head.weight"].requires_grad_(True)
    model.get_input_embeddings().register_forward_hook(lambda *a: None)
    before = _snapshot(model)
    GradientExtractor(model, ProjectionConfig(rank_in=8, rank_out=8)).extract(
        batches_of(make_examples(4, seed=13), 2, "left"), tokens=True, covariances=True
    )
    after = _snapshot(model)
    assert before["flags"] == after["flags"] and before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    for n in before["params"]:
        assert torch.equal(before["params"][n], after["params"][n]), n
        g0, g1 = before["grads"][n], after["grads"][n]
        assert (g0 is None and g1 is None) or torch.equal(g0, g1), n


def test_bad_input_errors():
    model = tiny_model("llama")
    ex = GradientExtractor(model, ProjectionConfig(rank_in=8, rank_out=8))
    good = collate(make_examples(2, seed=14))
    with pytest.raises(ValueError, match="no layer matches"):
        GradientExtractor(model, ProjectionConfig(include=["nonexistent"]))
    with pytest.raises(ValueError, match="no example"):
        ex.extract([])
    no_labels = dict(good, labels=torch.full_like(good["labels"], -100))
    with pytest.raises(ValueError, match="no label tokens"):
        ex.extract([no_labels])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ex.extract([dict(good, attention_mask=good["attention_mask"][:, :-1])])
    with pytest.raises(ValueError, match="input_ids"):
        ex.extract([{"labels": good["labels"]}])
    with pytest.raises(ValueError, match="no supported layer"):
        GradientExtractor(torch.nn.Sequential(torch.nn.Embedding(4, 4)))
    with pytest.raises(ValueError, match="kind"):
        ProjectionConfig(kind="sparse")
    with pytest.raises(ValueError, match="seed"):
        ProjectionConfig(seed=-1)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_flat_mode_is_the_jl_sketch_of_the_whole_gradient(kind):
    """Flat features = jl_project of the concatenated per-example gradients of all layers."""
    from fastinfluence import ops

    model = tiny_model("llama", torch.float64, lora=True)
    examples = make_examples(4, seed=15)
    cfg = ProjectionConfig(mode="flat", dim=96, kind=kind, seed=5, dtype="float64")
    feats = GradientExtractor(model, cfg).extract(batches_of(examples, 3, "left"))
    slow, _ = slow_gradients(model, examples)
    assert feats.layout == {"flat": (0, 96, (1, 96))}
    assert rel_err(feats.data, ops.jl_project(slow, 96, seed=5, kind=kind)) <= 1e-10
    with pytest.raises(ValueError, match="factorized"):
        GradientExtractor(model, cfg).extract(batches_of(examples, 3), tokens=True)


def test_bfloat16_model_features_track_float32():
    """A bf16 model (weights and activations rounded to 2^-8 relative) gives features within
    a few percent of the same model in float32; accumulation stays float32, output finite."""
    examples = make_examples(4, seed=16)
    cfg = ProjectionConfig(rank_in=16, rank_out=16)
    f32 = GradientExtractor(tiny_model("llama", torch.float32), cfg).extract(batches_of(examples, 2, "left"))
    bf16 = GradientExtractor(tiny_model("llama", torch.bfloat16), cfg).extract(batches_of(examples, 2, "left"))
    assert bf16.data.dtype == torch.float32 and torch.isfinite(bf16.data).all()
    assert rel_err(bf16.data, f32.data) <= 3e-2


def test_layer_without_a_path_to_the_loss_is_an_error():
    model = tiny_model("llama")
    block = model.model.layers[0]
    block.probe = torch.nn.Linear(32, 4)  # runs in the forward, its output is discarded

    def run_probe(_module, _inputs, output):
        block.probe(output)  # output discarded: no path to the loss

    block.mlp.register_forward_hook(run_probe)
    ex = GradientExtractor(model, ProjectionConfig(include=[r"probe"]))
    with pytest.raises(RuntimeError, match="got no gradient"):
        ex.extract(batches_of(make_examples(2, seed=17), 2))


def test_model_is_the_callers_between_yields():
    model = tiny_model("llama")
    model.train()
    ex = GradientExtractor(model, ProjectionConfig(rank_in=8, rank_out=8))
    batches = batches_of(make_examples(4, seed=18), 2)
    for a, b in zip(ex.iter_features(batches), ex.iter_features(batches)):
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert torch.equal(a.data, b.data)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_fingerprint_follows_the_weights():
    model = tiny_model("llama")
    ex = GradientExtractor(model, ProjectionConfig(rank_in=8, rank_out=8))
    before = ex.metadata()["fingerprint"]
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    after = ex.metadata()["fingerprint"]
    assert before["layers"] == after["layers"] and before["weights_sha256"] != after["weights_sha256"]
    assert ex.extract(batches_of(make_examples(2, seed=19), 2)).fingerprint == after


def test_numpy_and_tensor_ids_become_python_scalars():
    import numpy as np

    ex = GradientExtractor(tiny_model("llama"), ProjectionConfig(rank_in=8, rank_out=8))
    examples = make_examples(4, seed=20)
    batches = [dict(collate(examples[:2]), ids=np.arange(2)), dict(collate(examples[2:]), ids=torch.tensor([7, 9]))]
    ids = ex.extract(batches).ids
    assert ids == [0, 1, 7, 9] and all(type(i) is int for i in ids)
    with pytest.raises(ValueError, match="str or int"):
        ex.extract([dict(collate(examples[:1]), ids=[1.5])])


def test_loss_from_hidden_states_when_the_head_is_not_captured(monkeypatch):
    """Without a hook on the LM head, the loss comes from hidden states through the chunked
    linear cross-entropy: the head module never runs (no B x T x V logits) and the
    features equal those of the logits path."""
    from fastinfluence import capture

    model = tiny_model("llama", torch.float64, lora=True)
    cfg = ProjectionConfig(rank_in=16, rank_out=8, dtype="float64")
    batches = batches_of(make_examples(4, seed=22), 2, "left")
    ex = GradientExtractor(model, cfg)
    assert ex.capture.head is not None
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    fused = ex.extract(batches)
    handle.remove()
    assert calls == []
    monkeypatch.setattr(capture, "fused_head", lambda _model: None)  # the model's own logits
    assert rel_err(fused.data, GradientExtractor(model, cfg).extract(batches).data) <= 1e-10


def test_inputs_are_held_projected_from_the_forward(monkeypatch):
    """Each hooked layer keeps A P_in (k_in wide) from its forward, never its full input: the features
    (rows, per-token factors, covariance sums) equal those of the full-A path in float64."""
    from fastinfluence import capture, extract

    model = tiny_model("llama", dtype=torch.float64)
    config = ProjectionConfig(rank_in=4, rank_out=3, seed=2, dtype="float64")
    batches = batches_of(make_examples(5, seed=4), 2, "left")
    held = []
    keep = extract._Projected.__init__

    def spy(self, t):
        held.append(t.shape[-1])
        keep(self, t)

    monkeypatch.setattr(extract._Projected, "__init__", spy)
    fast = GradientExtractor(model, config).extract(batches, tokens=True, covariances=True)
    ex = GradientExtractor(model, config)
    hooked = [l for l in ex.layers if l is not ex.capture.head_layer]  # the fused head gets its A from the loss
    assert held and set(held) == {4} and len(held) == 3 * len(hooked)  # every hooked layer of every batch
    backward = capture.CapturePass.backward
    monkeypatch.setattr(capture.CapturePass, "backward", lambda self, *a, keep_input=None, **k: backward(self, *a, **k))
    full = GradientExtractor(model, config).extract(batches, tokens=True, covariances=True)
    assert rel_err(fast.data, full.data) < 1e-12
    for n in full.stats:
        assert rel_err(fast.stats[n][0], full.stats[n][0]) < 1e-12
        assert rel_err(fast.tokens.a[n], full.tokens.a[n]) < 1e-12
