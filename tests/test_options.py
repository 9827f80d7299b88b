"""Options objects shared by the API and the command line, and the errors that name parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastinfluence import errors
from fastinfluence.features import Features, LayerSlice
from fastinfluence.options import ScoreOptions, UnlearnOptions
from fastinfluence.scoring import score
from fastinfluence.store import MismatchError, StoreError


def _features(n: int, seed: int, ids_from: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, 24, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    layout = {"a": LayerSlice(0, 16, (4, 4)), "b": LayerSlice(16, 24, (2, 4))}
    return Features(data, data.norm(dim=1), list(range(ids_from, ids_from + n)), layout, None, {})


@pytest.mark.parametrize("metric, precondition", [("dot", None), ("cosine", "diagonal")])
def test_score_takes_options_or_keywords_alike(metric, precondition):
    query, train = _features(5, 0, ids_from=100), _features(37, 1)
    kw = dict(metric=metric, precondition=precondition, topk=4, chunk_rows=10, matrix=True)
    by_keywords, by_options = score(query, train, **kw), score(query, train, ScoreOptions(**kw))
    assert torch.equal(by_keywords.topk_indices, by_options.topk_indices)
    assert torch.equal(by_keywords.topk_values, by_options.topk_values)
    assert (by_keywords.matrix == by_options.matrix).all()
    # float64 features: the matrix is the plain-torch product (dot) or its cosine, to rounding
    q, t = query.data, train.data
    ref = q @ t.T if metric == "dot" else (q / q.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    if precondition is None:
        assert torch.allclose(torch.from_numpy(by_options.matrix).double(), ref, rtol=1e-6, atol=1e-6)


def test_score_refuses_options_and_keywords_together_in_one_line():
    query, train = _features(2, 0), _features(4, 1)
    with pytest.raises(errors.OptionsError, match=r"score\(\) got a ScoreOptions and keyword argument\(s\) topk") as e:
        score(query, train, ScoreOptions(metric="cosine"), topk=3)
    assert "\n" not in str(e.value) and "dataclasses.replace(options, topk=...)" in str(e.value)
    with pytest.raises(errors.OptionsError, match="unknown keyword argument.*metirc; the options are metric"):
        score(query, train, metirc="cosine")
    with pytest.raises(errors.OptionsError, match="takes a ScoreOptions as options, got dict"):
        score(query, train, {"metric": "cosine"})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(metric="l2"), "metric must be one of dot, cosine, got 'l2'"),
        (dict(topk=0), "topk must be >= 1"),
        (dict(topk=True), "topk must be >= 1"),
        (dict(chunk_rows=0), "chunk_rows must be >= 1"),
        (dict(damping=-1.0), "damping must be a positive finite number"),
        (dict(damping=float("inf")), "damping must be a positive finite number"),
        (dict(precondition="hessian"), "precondition must be None, a Preconditioner or one of"),
        (dict(matrix=True, matrix_path="m.npy"), "give matrix=True .* or matrix_path .* not both"),
    ],
)
def test_score_options_name_the_bad_field(kw, match):
    with pytest.raises(errors.OptionsError, match=match) as e:
        ScoreOptions(**kw)
    assert e.value.param == next(iter(kw)) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="gd"), "unknown unlearning method 'gd'; choose one of ga, graddiff"),
        (dict(reduction="batch"), "reduction must be one of token, example"),
        (dict(weight_norm="max"), "weight_norm must be one of mean, sum"),
        (dict(retain_loss_type="kl"), "retain_loss_type must be one of NLL, KL"),
        (dict(rapidun_tokens="some"), "rapidun_tokens must be one of all, differing"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(loss_reweight_tau=-1.0), "loss_reweight_tau must be > 0"),
    ],
)
def test_unlearn_options_name_the_bad_field(kw, match):
    with pytest.raises(errors.OptionsError, match=match) as e:
        UnlearnOptions(**kw)
    assert e.value.param == next(iter(kw))


def test_unlearn_options_temperature_and_retain_term():
    assert UnlearnOptions(method="npo").temperature == 0.1
    assert UnlearnOptions(method="simnpo").temperature == 2.5
    assert UnlearnOptions(method="npo", beta=0.3).temperature == 0.3
    assert not UnlearnOptions(method="ga").uses_retain
    assert all(UnlearnOptions(method=m).uses_retain for m in ("graddiff", "npo", "simnpo", "rapidun"))


def test_the_options_define_each_default_once():
    import inspect

    from fastinfluence.integrations.open_unlearning import trainers  # noqa: F401  (imports the module)
    from fastinfluence.unlearn import UnlearnTrainer

    # the keyword path of score and UnlearnTrainer has no defaults of its own to drift from the classes
    assert list(inspect.signature(score).parameters) == ["query", "train", "options", "kwargs"]
    own = set(inspect.signature(UnlearnTrainer.__init__).parameters)
    assert not own & {f.name for f in dataclasses.fields(UnlearnOptions)}


def test_messages_name_parameters_as_the_caller_writes_them():
    assert errors.name("allow_incomplete", True) == "allow_incomplete=True"
    assert errors.name("max_tokens", 4) == "max_tokens=4"
    assert errors.label("matrix_path") == "matrix_path="
    assert errors.switches(tokens=False, covariances=True) == "tokens=False, covariances=True"
    spelling = {"allow_incomplete": "--allow-incomplete", "max_tokens": "--max-tokens", "matrix_path": "--matrix"}
    spelling |= {"tokens": "--tokens", "covariances": "--covariances"}
    with errors.spelled_as(spelling):
        assert errors.name("allow_incomplete", True) == "--allow-incomplete"
        assert errors.name("max_tokens", 4) == "--max-tokens 4"
        assert errors.name("metric", "dot") == "metric='dot'"  # not in the table: the API's spelling
        assert errors.label("matrix_path") == "--matrix"
        assert errors.switches(tokens=False, covariances=True) == "--covariances"
        assert errors.switches(tokens=False, covariances=False) == "neither --tokens nor --covariances"
        with pytest.raises(errors.OptionsError, match="--max-tokens"):
            raise errors.OptionsError(f"raise {errors.name('max_tokens')}")
    assert errors.name("max_tokens") == "max_tokens"  # the spelling ends with its block


def test_library_input_errors_share_one_base_class_and_stay_value_errors():
    for cls in (errors.OptionsError, errors.UsageError, StoreError, MismatchError):
        assert issubclass(cls, errors.FastInfluenceError) and issubclass(cls, ValueError)
    assert issubclass(StoreError, RuntimeError)  # `except RuntimeError` around store access keeps working


def _trainer(tmp_path, **kwargs):
    from test_unlearn_data import planted_data, planted_model
    from transformers import TrainingArguments

    from fastinfluence.unlearn import UnlearnDataset, UnlearnTrainer

    retain, forget = planted_data(12, 4, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    return UnlearnTrainer(
        model=planted_model(), args=args, train_dataset=UnlearnDataset(forget, retain, ratio=2), **kwargs
    )


def test_unlearn_trainer_takes_options_or_keywords_alike(tmp_path):
    kw = dict(method="npo", alpha=0.5, gamma=2.0, beta=0.3, reduction="token", weight_norm="sum")
    by_keywords, by_options = _trainer(tmp_path, **kw), _trainer(tmp_path, options=UnlearnOptions(**kw))
    assert by_keywords.options == by_options.options == UnlearnOptions(**kw)
    batch = by_keywords.data_collator([by_keywords.train_dataset[i] for i in range(3)])
    losses = [t.compute_loss(t.model, batch).item() for t in (by_keywords, by_options)]
    assert (
        losses[0] == losses[1] and losses[0] != 0
    )  # the same model, batch and options: the same computation, bit for bit
    assert _trainer(tmp_path).options == UnlearnOptions()  # the defaults are the class's


def test_unlearn_trainer_refuses_options_and_keywords_together(tmp_path):
    with pytest.raises(errors.OptionsError, match=r"UnlearnTrainer\(\) got a UnlearnOptions and keyword.* alpha"):
        _trainer(tmp_path, options=UnlearnOptions(method="ga"), alpha=2.0)
