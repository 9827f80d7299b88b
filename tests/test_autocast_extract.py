"""ProjectionConfig(autocast=...): a low-precision forward close to the float32 features, off by default."""

import pytest
import torch
from helpers import batches_of, make_examples, rel_err, tiny_model

import fastinfluence as fi


def _state(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


@pytest.mark.parametrize("include", [None, [r"lm_head"]])
def test_bf16_autocast_close_to_float32_and_model_untouched(include):
    model = tiny_model("llama", torch.float32, seed=3)
    model.train()
    before = _state(model)
    batches = batches_of(make_examples(5, seed=21), 3, "left")
    cfg = dict(rank_in=8, rank_out=8, include=include)
    ref = fi.GradientExtractor(model, fi.ProjectionConfig(**cfg)).extract(batches)
    low = fi.GradientExtractor(model, fi.ProjectionConfig(**cfg, autocast="bfloat16")).extract(batches)
    assert low.data.dtype == torch.float32 and low.data.shape == ref.data.shape
    # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 per value), accumulated over a few
    # layers' matmuls: measured 0.2-0.4% here; 2% bounds it, far from the 1.0 of unrelated features.
    err = rel_err(low.data, ref.data)
    assert 0 < err < 0.02, err
    after = _state(model)
    assert all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    assert before[1:] == after[1:]


def test_default_metadata_has_no_autocast_and_mixing_is_refused():
    model = tiny_model("llama", torch.float32, seed=4)
    assert "autocast" not in fi.ProjectionConfig().to_dict()
    assert fi.ProjectionConfig.from_dict(fi.ProjectionConfig().to_dict()) == fi.ProjectionConfig()
    cfg = fi.ProjectionConfig(rank_in=4, rank_out=4, autocast="bfloat16")
    assert fi.ProjectionConfig.from_dict(cfg.to_dict()).autocast == "bfloat16"
    batches = batches_of(make_examples(3, seed=5), 3)
    low = fi.GradientExtractor(model, cfg).extract(batches)
    full = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=4, rank_out=4)).extract(batches)
    with pytest.raises(ValueError, match=r"\['autocast'\] is 'bfloat16' in .* and absent \(the default\) in the other"):
        fi.score(low, full, topk=1)


def test_bad_autocast():
    with pytest.raises(ValueError, match="autocast must be None"):
        fi.ProjectionConfig(autocast="int8")
    with pytest.raises(ValueError, match="float32 model"):
        fi.GradientExtractor(tiny_model("llama", torch.float64), fi.ProjectionConfig(autocast="bfloat16"))


def test_float16_autocast_on_a_cpu_warns_to_use_bfloat16():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="use autocast='bfloat16' on a CPU"):
        fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=4, rank_out=4, autocast="float16"))
