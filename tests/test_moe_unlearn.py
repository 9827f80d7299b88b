"""Unlearning, SIMU and evaluation on mixture-of-experts models.

References are written here, independent of the package: expert neurons from a per-token loop
over the (token, slot) pairs with the model's own gate function, every loss from the model's own
logits (``model(...).logits``), the router auxiliary loss from the model's own
``output_router_logits=True`` forward, and each fused parameter's unit layout spelt out per
architecture (halves of gate_up in Mixtral-style experts, interleaved in gpt-oss).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_of, collate, make_examples, one_thread, rel_err
from test_moe import moe_model
from transformers import TrainingArguments

from fastinfluence import losses, weights
from fastinfluence.evaluate import evaluate
from fastinfluence.lm import IGNORE_INDEX
from fastinfluence.moe import EXCLUDE_EXPERTS, experts_modules, neuron_units
from fastinfluence.unlearn import UnlearnDataset, UnlearnTrainer, apply_neuron_masks


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread (the default spreads each small op over every core)."""
    with one_thread():
        yield


FORGET, RETAIN = make_examples(4, seed=21), make_examples(6, seed=22)
SHORT_F, SHORT_R = make_examples(3, seed=23, max_len=8), make_examples(3, seed=24, max_len=8)


# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------


def reference_nll(model, batch):
    """(B,) answer NLL sums and (B,) counts from the model's own logits (positions counted from each
    example's first token, so that left padding does not move them)."""
    mask = batch["attention_mask"]
    leading = (mask.cumsum(1) == 0).sum(1, keepdim=True)
    positions = (torch.arange(mask.shape[1]) - leading).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False).logits
    target = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], 1)
    tok = F.cross_entropy(logits.double().flatten(0, 1), target.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    return tok.view(target.shape).sum(1), (target != IGNORE_INDEX).sum(1)


def per_token_experts(experts, seen):
    """A forward for ``experts`` computing each (token, slot) pair on its own, keeping each
    pair's intermediate activation h (with its gradient) in ``seen`` as (expert, h)."""
    t, up_name = experts.is_transposed, "gate_up_proj" if experts.has_gate else "up_proj"

    def linear(W, b, x, e):
        y = x @ W[e] if t else W[e] @ x
        return y if b is None else y + b[e]

    def forward(hidden, top_k_index, top_k_weights, *args, **kwargs):
        rows = []
        for n in range(hidden.shape[0]):
            acc = torch.zeros_like(hidden[n])
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[n, k])
                up = linear(getattr(experts, up_name), getattr(experts, up_name + "_bias", None), hidden[n], e)
                h = experts._apply_gate(up[None])[0] if experts.has_gate else experts.act_fn(up)
                h.retain_grad()
                seen.append((e, h))
                down = linear(experts.down_proj, getattr(experts, "down_proj_bias", None), h, e)
                acc = acc + top_k_weights[n, k] * down
            rows.append(acc)
        return torch.stack(rows)

    return forward


def reference_expert_attribution(model, batches):
    """{<experts>.<e>: (I,)} mean over examples of sum over routed tokens |h * dL/dh|, L = sum of the
    examples' mean answer CE from the model's own logits."""
    totals, count = {}, 0
    modules = experts_modules(model)
    for batch in batches:
        seen = {name: [] for name in modules}
        for name, ex in modules.items():
            ex.forward = per_token_experts(ex, seen[name])
        try:
            s, c = reference_nll(model, batch)
            model.zero_grad(set_to_none=True)
            (s / c).sum().backward()
        finally:
            for ex in modules.values():
                del ex.forward
        for name, pairs in seen.items():
            E, I = modules[name].down_proj.shape[0], pairs[0][1].shape[0]
            for e in range(E):
                totals.setdefault(f"{name}.{e}", torch.zeros(I, dtype=torch.float64))
            for e, h in pairs:
                totals[f"{name}.{e}"] += (h.detach() * h.grad).abs().double()
        count += len(batch["input_ids"])
    model.zero_grad(set_to_none=True)
    return {k: v / count for k, v in totals.items()}


def brute_force_mask(forget, retain, ff, rf, dual=False):
    """Top-k by sorting in Python: the k = round(f I) largest forget attributions that are positive,
    less the k' largest retain ones (unless dual)."""
    I = len(forget)
    top = lambda x, frac: set(sorted(range(I), key=lambda j: (-float(x[j]), j))[: round(frac * I)])  # noqa: E731
    chosen = {j for j in top(forget, ff) if forget[j] > 0}
    if not dual:
        chosen -= top(retain, rf)
    return torch.tensor([j in chosen for j in range(I)])


def unit_layout(arch, experts, mask):
    """(up units (d_up,), down units (I,)) of a neuron mask, from each architecture's documented layout."""
    if arch == "gpt_oss":  # gate_up interleaved: gate 2j, up 2j + 1
        return mask.repeat_interleave(2), mask
    return torch.cat([mask, mask]), mask  # gate_up = [gate; up]


def keep_reference(arch, experts, masks, name):
    """Reference keep masks, full parameter shape, for the fused parameters of ``experts``."""
    t = experts.is_transposed
    up, down = experts.gate_up_proj, experts.down_proj
    k_up, k_down = torch.zeros(up.shape, dtype=torch.bool), torch.zeros(down.shape, dtype=torch.bool)
    k_bias = torch.zeros(up.shape[:1] + up.shape[2 if t else 1 :][:1], dtype=torch.bool)
    for e in range(up.shape[0]):
        m = masks.get(f"{name}.{e}")
        if m is None:
            continue
        u, d = unit_layout(arch, experts, m)
        if t:  # (E, H, 2I), (E, I, H)
            k_up[e][:, u], k_down[e][d, :] = True, True
        else:  # (E, 2I, H), (E, H, I)
            k_up[e][u, :], k_down[e][:, d] = True, True
        k_bias[e][u] = True
    return k_up, k_down, k_bias


# ---------------------------------------------------------------------------------------
# SIMU on experts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_simu_expert_masks_equal_a_per_token_brute_force_float64(arch):
    model = moe_model(arch)
    forget, retain = batches_of(SHORT_F, 2), batches_of(SHORT_R, 3, "left")
    ref_f, ref_r = reference_expert_attribution(model, forget), reference_expert_attribution(model, retain)
    got_f = weights.neuron_attribution(model, forget, weights._AnswerNll())
    got_r = weights.neuron_attribution(model, retain, weights._AnswerNll())
    tol = 1e-6 if arch == "deepseek_v3" else 1e-10  # its router runs in float32 (test_moe.TOL64)
    for key in ref_f:
        for got, ref in ((got_f[key], ref_f[key]), (got_r[key], ref_r[key])):
            assert torch.equal(got, ref) if not ref.any() else rel_err(got, ref) <= tol, key
    dense = set(got_f) - set(ref_f)  # Qwen2-MoE's shared expert, DeepSeek-V3's dense first layer and shared experts
    assert all(".experts." not in k for k in dense) and (len(dense) > 0) == (arch in ("qwen2_moe", "deepseek_v3"))
    dual = arch == "gpt_oss"
    masks = weights.simu_mask(model, forget, retain, forget_fraction=0.5, retain_fraction=0.25, dual=dual)
    assert set(masks) == set(got_f)
    for key in ref_f:
        assert torch.equal(masks[key], brute_force_mask(ref_f[key], ref_r[key], 0.5, 0.25, dual)), key
    if arch in ("gpt_oss", "deepseek_v3"):  # the last expert is never routed to: nothing of it is selected
        last = [f"{name}.{m.down_proj.shape[0] - 1}" for name, m in experts_modules(model).items()]
        assert last and all(not masks[k].any() and not ref_f[k].any() for k in last)
    assert any(masks[k].any() for k in ref_f)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_neuron_units_follow_the_gate_layout(arch):
    model = moe_model(arch)
    experts = next(iter(experts_modules(model).values()))
    I = experts.down_proj.shape[1 if experts.is_transposed else 2]
    units = neuron_units(experts)
    for j in range(I):
        one = torch.zeros(I, dtype=torch.bool)
        one[j] = True
        assert torch.equal(units[j], unit_layout(arch, experts, one)[0])


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_masked_expert_gradients_touch_only_the_selected_units(arch, tmp_path):
    model = moe_model(arch)
    name = next(iter(experts_modules(model)))
    experts = model.get_submodule(name)
    g = torch.Generator().manual_seed(3)
    I = experts.down_proj.shape[1 if experts.is_transposed else 2]
    masks = {f"{name}.{e}": torch.rand(I, generator=g) < 0.4 for e in (0, 2)}
    params = [experts.gate_up_proj, experts.down_proj] + ([experts.gate_up_proj_bias] if arch == "gpt_oss" else [])
    batch = collate(FORGET)
    s, c = reference_nll(model, batch)
    full = torch.autograd.grad((s / c).sum(), params)
    handles = apply_neuron_masks(model, masks)
    try:
        s, c = reference_nll(model, batch)
        (s / c).sum().backward()
        k_up, k_down, k_bias = keep_reference(arch, experts, masks, name)
        for p, f, k in zip(params, full, (k_up, k_down, k_bias)):
            assert torch.equal(p.grad, f * k)
            assert (p.grad[k] != 0).any()
        others = [n for n, p in model.named_parameters() if p.requires_grad and all(p is not q for q in params)]
        assert not others  # every other parameter, other layers' experts included, is frozen
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)

    model = moe_model(arch)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, tmp_path, method="graddiff", simu_masks=masks, steps=3, lr=1e-2, weight_decay=0.1)
    trainer.train()
    after = model.state_dict()
    k_up, k_down, k_bias = keep_reference(arch, model.get_submodule(name), masks, name)
    keep = {f"{name}.gate_up_proj": k_up, f"{name}.down_proj": k_down, f"{name}.gate_up_proj_bias": k_bias}
    changed = 0
    for key, b in before.items():
        k = keep.get(key)
        if k is None:
            assert torch.equal(after[key], b), key
        else:
            assert torch.equal(after[key][~k], b[~k]), key
            changed += int((after[key][k] != b[k]).sum())
    assert changed > 0


def test_simu_masks_naming_unknown_experts_or_wrong_sizes_are_refused():
    model = moe_model("mixtral")
    with pytest.raises(ValueError, match=r"not MLP blocks or experts of this model"):
        apply_neuron_masks(model, {"model.layers.0.mlp.experts.9": torch.ones(12, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"experts.0'\]: model.layers.0.mlp.experts has 4 experts of 12 neurons"):
        apply_neuron_masks(model, {"model.layers.0.mlp.experts.0": torch.ones(5, dtype=torch.bool)})


# ---------------------------------------------------------------------------------------
# Losses and the trainer
# ---------------------------------------------------------------------------------------


def _trainer(model, tmp_path, steps=1, lr=1e-3, weight_decay=0.0, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=steps,
        learning_rate=lr,
        weight_decay=weight_decay,
        lr_scheduler_type="constant",
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=2,
        seed=0,
    )
    data = UnlearnDataset(
        [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in FORGET],
        [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in RETAIN],
        ratio=2,
    )
    return UnlearnTrainer(model=model, args=args, train_dataset=data, **kwargs)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"])
def test_weighted_losses_on_the_fused_path_equal_the_model_logits_float64(arch):
    model = moe_model(arch)
    batch = collate(FORGET, "left")
    w = torch.rand(len(FORGET), generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    ref_s, ref_c = reference_nll(model, batch)
    ref_mean = ref_s / ref_c
    nll = losses.sequence_nll(model, batch)
    assert losses.fused_head(model) is not None and torch.equal(nll.count, ref_c)
    ref_sum = ref_s.detach() + 0.3
    cases = {
        "ga": (losses.ga(nll, w), -(w * ref_mean).mean()),
        "ga_token": (losses.ga(nll, w, reduction="token"), -(w * ref_s).sum() / ref_c.sum()),
        "npo": (losses.npo(nll, ref_sum, w, beta=0.1), (w * 20 * F.softplus(0.1 * (ref_sum - ref_s))).mean()),
        "simnpo": (
            losses.simnpo(nll, w, beta=2.5, delta=0.5),
            (w * -0.8 * F.logsigmoid(2.5 * (ref_mean - 0.5))).mean(),
        ),
    }
    experts = next(iter(experts_modules(model).values()))
    tol = 1e-6 if arch == "deepseek_v3" else 1e-12
    for key, (out, ref) in cases.items():
        assert rel_err(out, ref) <= tol, key
        g_out, g_ref = (
            torch.autograd.grad(out, experts.down_proj, retain_graph=True)[0],
            torch.autograd.grad(ref, experts.down_proj, retain_graph=True)[0],
        )
        assert rel_err(g_out, g_ref) <= tol * 100, key


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_router_aux_loss_is_left_out_by_default_and_added_on_request(arch, tmp_path):
    model = moe_model(arch)
    model.config.output_router_logits = True  # the model's own config asks for it: still left out by default
    trainer = _trainer(model, tmp_path, method="graddiff")
    item = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)])
    f, r = item["forget"], item["retain"]
    router = model.model.layers[1].mlp.get_submodule("router" if arch == "gpt_oss" else "gate").weight

    def reference(coef):
        fs, fc = reference_nll(model, f)
        rs, rc = reference_nll(model, r)
        loss = -(f["weights"].double() * fs / fc).mean() + (r["weights"].double() * rs / rc).mean()
        for b in (f, r) if coef else ():
            out = model(**{k: b[k] for k in ("input_ids", "attention_mask")}, output_router_logits=True)
            loss = loss + coef * out.aux_loss
        return loss

    for option, coef in ((False, 0.0), (True, model.config.router_aux_loss_coef), (0.25, 0.25)):
        if option is not False:
            trainer = _trainer(model, tmp_path, method="graddiff", router_aux_loss=option)
        out, ref = trainer.compute_loss(model, item), reference(coef)
        # without the auxiliary loss float64 throughout; the model computes it in float32
        tol = 1e-12 if not coef else 2e-7
        assert rel_err(out, ref) <= tol, option
        g_out, g_ref = (torch.autograd.grad(x, router)[0] for x in (out, ref))
        assert rel_err(g_out, g_ref) <= tol * 100, option
        if coef:
            assert rel_err(out, reference(0.0)) > 1e-6  # the option changes the loss
            trainer._router_aux.remove()


def test_router_aux_loss_is_refused_for_models_without_one(tmp_path):
    with pytest.raises(ValueError, match=r"^router_aux_loss: DeepseekV3ForCausalLM has no router auxiliary loss"):
        _trainer(moe_model("deepseek_v3"), tmp_path, router_aux_loss=True)


def test_npo_unlearning_runs_on_an_moe_model_and_raises_the_forget_loss(tmp_path):
    model = moe_model("qwen2_moe", torch.float32)
    forget = collate(FORGET)
    with torch.no_grad():
        before = losses.sequence_nll(model, forget).mean.mean().item()
    model.train()
    trainer = _trainer(model, tmp_path, method="npo", steps=3, lr=3e-2, router_aux_loss=True)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "router_aux_loss" in h]
    assert logged and all(math.isfinite(h["router_aux_loss"]) and h["router_aux_loss"] > 0 for h in logged)
    with torch.no_grad():
        after = losses.sequence_nll(model.eval(), forget).mean.mean().item()
    assert math.isfinite(after) and after > before


def test_evaluate_on_an_moe_model_equals_the_model_logits():
    model = moe_model("olmoe")
    clean, forget, holdout = batches_of(RETAIN, 3), batches_of(FORGET, 2, "left"), batches_of(RETAIN[:3], 3)
    out = evaluate(model, clean=clean, forget=forget, holdout=holdout)

    def means(batches):
        rows = [reference_nll(model, b) for b in batches]
        return torch.cat([s / c for s, c in rows]), sum(s.sum() for s, _ in rows), sum(c.sum() for _, c in rows)

    with torch.no_grad():
        _, total, count = means(clean)
        f_mean, _, _ = means(forget)
        h_mean, _, _ = means(holdout)
    assert rel_err(torch.tensor(out["clean_ppl"], dtype=torch.float64), torch.exp(total / count)) <= 1e-12
    assert rel_err(torch.tensor(out["forget_nll"], dtype=torch.float64), f_mean.mean()) <= 1e-12
    pairs = [(float(-a > -b) + 0.5 * float(a == b)) for a in f_mean for b in h_mean]
    assert out["mia_auc_loss"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


# ---------------------------------------------------------------------------------------
# LoRA on experts (PEFT target_parameters)
# ---------------------------------------------------------------------------------------


def _lora_moe(arch, peft, **lora):
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    cfg = dict(r=2, target_modules=["q_proj"], target_parameters=targets, init_lora_weights=False) | lora
    return peft.get_peft_model(moe_model(arch), peft.LoraConfig(**cfg)), cfg


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_lora_on_experts_is_captured_exactly_float64(arch):
    peft = pytest.importorskip("peft")
    from fastinfluence import GradientExtractor, ProjectionConfig, exact_scores, ops

    model, _ = _lora_moe(arch, peft)
    ext = GradientExtractor(model, ProjectionConfig(rank_in=2, rank_out=2))
    expert_lora = [l.name for l in ext.layers if ".experts." in l.name]
    assert len(expert_lora) == 2 * 2 * 2  # 2 blocks x (gate_up, down) x (lora_A, lora_B)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert {id(l.weight) for l in ext.layers} == {id(p) for p in params}  # every adapter, no other weight
    rows = []
    for ids, labels in FORGET:  # per-example gradients of every adapter, one example at a time
        s, c = reference_nll(model, collate([(ids, labels)]))
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad((s / c).sum(), params)]))
    grads = torch.stack(rows)
    scores = exact_scores(model, batches_of(FORGET, 2), batches_of(FORGET, 3, "left"))
    assert rel_err(scores, grads @ grads.T) <= 1e-10
    feats = ext.extract(batches_of(FORGET, 2)).data
    assert feats.shape == (len(FORGET), ext.dim) and feats.abs().sum() > 0
    # flat mode sketches the experts' adapters' per-example gradients too
    cfg = ProjectionConfig(mode="flat", dim=16, dtype="float64")
    sketch = GradientExtractor(model, cfg).extract(batches_of(FORGET, 2)).data
    assert rel_err(sketch, ops.jl_project(grads, 16, seed=cfg.seed, kind=cfg.kind)) <= 1e-10
    flat = GradientExtractor(model, ProjectionConfig(mode="flat", dim=16, exclude=[EXCLUDE_EXPERTS]))
    assert [l.name for l in flat.layers] == [l.name for l in ext.layers if ".experts." not in l.name]


def test_lora_on_experts_unlearns_the_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    model, lora = _lora_moe("mixtral", peft)
    batch = collate(FORGET)
    s, c = reference_nll(model, batch)  # the adapters are random (init_lora_weights=False): they count
    assert rel_err(losses.sequence_nll(model, batch).sum, s) <= 1e-12

    base = moe_model("mixtral")
    params = dict(base.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    trainer = _trainer(base, tmp_path, method="graddiff", lora=peft.LoraConfig(**lora), steps=2, lr=1e-2)
    adapters = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if "experts" in n and p.requires_grad
    }
    assert adapters and all("lora_" in n for n in adapters)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in adapters.items())  # the experts' adapters moved
    for k, v in params.items():  # the base weights, fused experts included, did not
        assert torch.equal(v, before[k]), k
