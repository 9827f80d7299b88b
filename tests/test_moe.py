"""Mixture-of-experts models: every expert, router, shared-expert and attention weight matrix is
captured, and features and exact scores equal per-example gradients taken the slow way.

The reference is written here, independent of the capture: one example at a time through the
model's own forward (its own experts implementation), ``torch.autograd.grad`` of the example's
mean answer-token loss w.r.t. each parameter, the fused expert parameters sliced per expert.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
import transformers as tf
from helpers import VOCAB, batches_of, make_examples, one_thread, rel_err

from fastinfluence import GradientExtractor, ProjectionConfig, exact_scores
from fastinfluence.capture import CapturePass, select_layers
from fastinfluence.lm import IGNORE_INDEX
from fastinfluence.projection import layer_projections

E, TOP_K = 4, 2


def _config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=12, num_local_experts=E, num_experts_per_tok=TOP_K, **common)
    if arch == "qwen2_moe":  # shared expert and its sigmoid gate beside the routed experts
        return tf.Qwen2MoeConfig(
            intermediate_size=20,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,
            num_experts=E,
            num_experts_per_tok=TOP_K,
            **common,
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            intermediate_size=20,
            moe_intermediate_size=12,
            num_experts=E,
            num_experts_per_tok=TOP_K,
            head_dim=4,
            **common,
        )
    if arch == "olmoe":
        return tf.OlmoeConfig(intermediate_size=12, num_experts=E, num_experts_per_tok=TOP_K, **common)
    if arch == "gpt_oss":  # transposed, interleaved gate_up with expert biases; router with a bias
        return tf.GptOssConfig(
            intermediate_size=12, num_local_experts=E, num_experts_per_tok=TOP_K, head_dim=4, sliding_window=8, **common
        )
    if arch == "deepseek_v3":  # a dense first layer, MLA attention, shared experts, sigmoid group routing
        return tf.DeepseekV3Config(
            intermediate_size=20,
            moe_intermediate_size=12,
            n_routed_experts=E,
            num_experts_per_tok=TOP_K,
            n_group=2,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=8,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=4,
            **{**common, "num_key_value_heads": 4},
        )
    raise ValueError(arch)


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")


def moe_model(arch: str, dtype=torch.float64, experts: str = "eager"):
    """A tiny MoE model; in gpt-oss and DeepSeek-V3 the last expert is never chosen (a router bias
    of -1e3, an e_score_correction_bias of -10), so its rows must be zeros."""
    torch.manual_seed(0)
    cfg = _config(arch)
    cfg.initializer_range = 0.2  # larger than the default 0.02, so that routing and gates are far from uniform
    attn = "eager" if arch == "gpt_oss" else "sdpa"  # gpt-oss has no SDPA path (attention sinks)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, experts_implementation=experts)
    with torch.no_grad():
        for name, module in model.named_modules():
            if arch == "gpt_oss" and name.endswith("mlp.router"):
                module.bias[-1] = -1e3
            if arch == "deepseek_v3" and name.endswith("mlp.gate"):
                module.e_score_correction_bias[-1] = -10.0
    return model.to(dtype).eval()


def reference_gradients(model, examples, names):
    """(N, P) per-example gradients [grad W | grad b] of the named layers, each (d_out, d_in [+1])
    flattened in ``names`` order; an expert layer ``<experts>.<e>.<param>`` is slice e of the fused
    parameter (transposed where the model stores it (E, d_in, d_out))."""
    params = []
    for name in names:
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", name)
        if m:
            experts = model.get_submodule(m[1])
            w, b = getattr(experts, m[3]), getattr(experts, m[3] + "_bias", None)
            params.append((w, b, int(m[2]), experts.is_transposed))
        else:
            module = model.get_submodule(name)
            params.append((module.weight, getattr(module, "bias", None), None, False))
    leaves = list({id(p): p for w, b, _, _ in params for p in (w, b) if p is not None}.values())
    flags = [p.requires_grad for p in leaves]
    rows = []
    try:
        for p in leaves:
            p.requires_grad_(True)
        for ids, labels in examples:
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
            target = labels[1:]
            keep = target != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(logits[keep].double(), target[keep])
            grads = dict(zip(map(id, leaves), torch.autograd.grad(loss, leaves)))
            parts = []
            for w, b, e, transposed in params:
                gw = grads[id(w)] if e is None else grads[id(w)][e]
                gw = gw.T if transposed else gw
                if b is not None:
                    gb = grads[id(b)] if e is None else grads[id(b)][e]
                    gw = torch.cat([gw, gb[:, None]], dim=1)
                parts.append(gw.flatten())
            rows.append(torch.cat(parts))
    finally:
        for p, flag in zip(leaves, flags):
            p.requires_grad_(flag)
    return torch.stack(rows)


def _weight_matrices(model):
    """Names of the model's weight matrices that influence is meant to cover: every parameter of
    two or more dimensions except embeddings and biases."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in embeddings and "bias" not in n}


def _features_reference(extractor, grads):
    """phi = P_out^T grad W P_in per layer from reference gradients, in the extractor's layout."""
    parts, start = [], 0
    for layer in extractor.layers:
        P_in, P_out = (P.double() for P in layer_projections(layer, extractor.config))
        size = layer.d_out * (layer.d_in + int(layer.bias))
        W = grads[:, start : start + size].view(-1, layer.d_out, layer.d_in + int(layer.bias))
        parts.append((P_out.T @ W @ P_in).flatten(1))
        start += size
    return torch.cat(parts, dim=1)


QUERIES, TRAIN = make_examples(3, seed=11), make_examples(5, seed=12)
# float64: only summation order differs (and DeepSeek-V3's router, whose logits the model itself
# computes in float32: one float32 rounding of A and of the router's products, ~1e-7 relative).
TOL64 = {"deepseek_v3": 1e-6}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_selection_captures_every_weight_matrix(arch, caplog):
    model = moe_model(arch)
    with caplog.at_level(logging.INFO, logger="fastinfluence.capture"):
        layers = select_layers(model)
    assert "100.0% of the trainable weight matrices" in caplog.text
    names = [l.name for l in layers]
    blocks = [n for n, m in model.named_modules() if n.endswith(".experts") and hasattr(m, "down_proj")]
    for block in blocks:  # every expert of every MoE block, both fused parameters, and its router
        up = "gate_up_proj"
        assert all(f"{block}.{e}.{p}" in names for e in range(E) for p in (up, "down_proj"))
        router = block.rsplit(".", 1)[0] + (".router" if arch == "gpt_oss" else ".gate")
        assert router in names
    fused = {f"{b}.{p}" for b in blocks for p in ("gate_up_proj", "down_proj")}
    covered = {n + ".weight" for n in names if ".experts." not in n} | fused
    assert _weight_matrices(model) <= covered


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_scores_and_features_match_per_example_autograd_float64(arch):
    model = moe_model(arch)
    with one_thread():
        extractor = GradientExtractor(model, ProjectionConfig(rank_in=6, rank_out=6, dtype="float64"))
        names = [l.name for l in extractor.layers]
        Gq, Gt = reference_gradients(model, QUERIES, names), reference_gradients(model, TRAIN, names)
        tol = TOL64.get(arch, 1e-10)
        for method in ("ghost", "dense"):
            out = exact_scores(model, batches_of(QUERIES, 2, "left"), batches_of(TRAIN, 3), method=method)
            assert rel_err(out, Gq @ Gt.T) <= tol, method
        feats = extractor.extract(batches_of(TRAIN, 3, "left"))
        assert rel_err(feats.data, _features_reference(extractor, Gt)) <= tol
        assert rel_err(extractor.extract(batches_of(TRAIN, 2)).data, feats.data) <= tol  # right padding
    experts = [l for l in extractor.layers if l.routed]
    blocks = Gt.split([l.d_out * (l.d_in + int(l.bias)) for l in extractor.layers], dim=1)
    zero = [bool((b == 0).all()) for l, b in zip(extractor.layers, blocks) if l.routed]
    assert not all(zero) and len(experts) == 2 * E * (1 if arch == "deepseek_v3" else 2)
    if arch in ("gpt_oss", "deepseek_v3"):  # the expert no token reaches: zeros, in features too
        sl = extractor.layout[experts[-1].name]
        assert zero[-1] and not feats.data[:, sl.start : sl.stop].any()
    per_example = [bool((b[i] == 0).all()) for b in blocks for i in range(len(TRAIN))]
    assert any(per_example)  # some example routes no token to some expert


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm", "eager"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_float32_matches_each_experts_implementation(arch, experts):
    """float32 against the model's own experts implementation (grouped_mm by default). The capture
    runs the same math on the same routed tokens in another order of summation: each product is
    exact to a few float32 ulps (6e-8), compounded through two blocks' forward and backward and
    summed over ~100 terms per score; measured 3e-7 to 2e-6 on each of the six models and three
    implementations, bounded by 1e-4 where a wrong routing or a missing routing weight gives O(1)."""
    model = moe_model(arch, torch.float32, experts)
    with one_thread():
        names = [l.name for l in select_layers(model)]
        Gq, Gt = reference_gradients(model, QUERIES, names), reference_gradients(model, TRAIN, names)
        out = exact_scores(model, batches_of(QUERIES, 2, "left"), batches_of(TRAIN, 3))
    assert out.dtype == torch.float32
    assert rel_err(out, Gq @ Gt.T) <= 1e-4


def test_capture_reproduces_the_model_losses_and_leaves_it_unchanged():
    model = moe_model("qwen2_moe", torch.float32, "grouped_mm")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    batch = batches_of(TRAIN, 5, "left")[0]
    capture = CapturePass(model)
    step = next(iter(capture.batches([batch])))
    losses = capture.backward(step.batch, lambda *a: None)
    for i, (ids, labels) in enumerate(TRAIN):
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1]
        keep = labels[1:] != IGNORE_INDEX
        ref = torch.nn.functional.cross_entropy(logits[keep], labels[1:][keep])
        assert abs(float(losses[i]) - float(ref)) <= 1e-5
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert forwards == {n: m.__dict__.get("forward") for n, m in model.named_modules()}


def test_include_and_exclude_by_expert_name():
    model = moe_model("mixtral")
    cfg = ProjectionConfig(include=[r"experts\.1\.", r"mlp\.gate$"], exclude=[r"layers\.0\."])
    names = [l.name for l in select_layers(model, cfg.include, cfg.exclude)]
    assert names == [
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.experts.1.gate_up_proj",
        "model.layers.1.mlp.experts.1.down_proj",
    ]
    Gq = reference_gradients(model, QUERIES, names)
    Gt = reference_gradients(model, TRAIN, names)
    out = exact_scores(model, batches_of(QUERIES, 3), batches_of(TRAIN, 5, "left"), cfg, metric="cosine")
    ref = (Gq @ Gt.T) / Gq.norm(dim=1)[:, None] / Gt.norm(dim=1)[None, :]
    assert rel_err(out, ref) <= 1e-10


def test_unsupported_consumers_and_kernels_say_what_to_exclude_or_load():
    model = moe_model("olmoe")
    batches = batches_of(TRAIN, 5)
    cfg = ProjectionConfig(exclude=[r"\.experts\.\d+\."], mode="flat", dim=64)
    assert GradientExtractor(model, cfg).extract(batches).data.shape == (5, 64)
    model.config._experts_implementation = "sonicmoe"  # a kernel that cannot be hooked (not loaded: never run)
    with pytest.raises(ValueError, match=r"implementation='sonicmoe'.*set_experts_implementation\('grouped_mm'\)"):
        exact_scores(model, batches, batches)


def test_uncapturable_weights_warn_once_naming_them():
    model = moe_model("mixtral")
    model.model.layers[0].mlp.extra = torch.nn.Module()
    model.model.layers[0].mlp.extra.kernel = torch.nn.Parameter(torch.zeros(3, 4, 5))
    with pytest.warns(UserWarning, match=r"1 trainable weight matrices .* model\.layers\.0\.mlp\.extra\.kernel"):
        select_layers(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_layers(model)  # once per model


def test_expert_covariances_are_sums_over_their_routed_tokens():
    """K-FAC statistics per expert: sum a~ a~^T over the expert's routed tokens, with their count.
    Each attended token reaches TOP_K experts, and the router sees every attended token with the
    same input, so (identity P_in) the experts' input sums add up to TOP_K times the router's."""
    model = moe_model("mixtral")
    feats = GradientExtractor(model, ProjectionConfig(rank_in=16, rank_out=8)).extract(
        batches_of(TRAIN, 3, "left"), covariances=True
    )
    tokens = sum(len(ids) for ids, _ in TRAIN)
    for block in ("model.layers.0.mlp", "model.layers.1.mlp"):
        CA_router, _, n_router = feats.stats[f"{block}.gate"]
        parts = [feats.stats[f"{block}.experts.{e}.gate_up_proj"] for e in range(E)]
        assert n_router == tokens and sum(n for _, _, n in parts) == TOP_K * tokens
        assert rel_err(sum(CA for CA, _, _ in parts), TOP_K * CA_router) <= 1e-12  # float64 model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [(8, 12), (5, 3)])
def test_segment_outer_sorted_unsorted_and_empty_examples(dtype, width):
    """Sorted rows take one grouped matmul (float32, 16-byte rows), others the index_add path; both
    equal a per-example loop, examples with no row are zero. float32: one product of <= 7 rows."""
    from fastinfluence.ops.routed import segment_outer

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(7, width[0], generator=g, dtype=dtype), torch.randn(7, width[1], generator=g, dtype=dtype)
    for example in (torch.tensor([0, 0, 2, 2, 2, 3, 3]), torch.tensor([3, 0, 2, 0, 2, 3, 2])):
        ref = torch.stack([X[example == b].T @ Y[example == b] for b in range(5)])
        out = segment_outer(X, Y, example, 5)
        assert out.shape == (5, *width) and not out[1].any() and not out[4].any()
        assert rel_err(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-14)
    assert not segment_outer(X[:0], Y[:0], example[:0], 5).any()
