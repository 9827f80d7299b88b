"""InfluenceCallback on a mixture-of-experts model: the stores it writes from the Trainer's own steps,
every expert and router included, equal post-hoc extraction at the same weights (the checkpoint of
each step), in float64."""

from __future__ import annotations

import re

import pytest
from helpers import one_thread
from test_callback import _check_against_extraction, _float64_loss, _train
from test_moe import moe_model

from fastinfluence import FeatureStore, ProjectionConfig
from fastinfluence.callback import interval_stores


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread (the default spreads each small op over every core)."""
    with one_thread():
        yield


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
def test_callback_features_of_experts_equal_extraction_at_the_same_weights(arch, tmp_path):
    # gpt-oss: transposed fused experts with biases, a router with a bias; Mixtral: the common layout
    model = _float64_loss(moe_model(arch))
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    callback, snaps = _train(model, tmp_path, config, accumulation=2, steps=2)
    names = [l.name for l in callback.extractor.layers]
    assert sum(bool(re.search(r"\.experts\.\d+\.(gate_up|down)_proj$", n)) for n in names) == 2 * 4 * 2
    assert sum(len(FeatureStore.open(p)) for p in interval_stores(tmp_path / "features")) == 2 * 2 * 2
    # float64 weights, but the models' RMSNorm computes in float32 (and Mixtral's routing softmax): the
    # training batch (two examples, padded) and the one-example extraction round differently there, so
    # they agree to ~1e-7, as test_callback's Llama comparison; a wrong routed token or scale is off by O(1).
    _check_against_extraction(model, tmp_path, config, snaps, 1e-6)


def test_callback_features_of_lora_on_experts_equal_extraction(tmp_path):
    peft = pytest.importorskip("peft")
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=experts, init_lora_weights=False)
    model = _float64_loss(peft.get_peft_model(moe_model("gpt_oss"), lora))
    config = ProjectionConfig(rank_in=4, rank_out=4, dtype="float64")
    callback, snaps = _train(model, tmp_path, config, accumulation=1, steps=2)
    names = [l.name for l in callback.extractor.layers]
    assert all("lora_" in n for n in names) and sum(".experts." in n for n in names) == 2 * 2 * 2
    _check_against_extraction(model, tmp_path, config, snaps, 1e-6)  # float32 RMSNorm, as above
