"""The one capture pass: every entry point that needs captured (A, G) goes through ``CapturePass``,
so each returns data order for length-bucketed batches, checks batches against the model and runs
its forward under the configured autocast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fastinfluence as fi
from fastinfluence import capture as capture_module
from fastinfluence.batching import length_batches
from fastinfluence.capture import CapturePass
from fastinfluence.kfac import fit_kfac, kfac_scores
from fastinfluence.normalizer import Normalizer
from tests.helpers import VOCAB, collate, make_examples, one_thread, rel_err, tiny_model

N = 13
IDS = [f"ex{i}" for i in range(N)]
CONFIG = fi.ProjectionConfig(rank_in=6, rank_out=5, seed=1, dtype="float64", include=[r"layers\.1\.(self_attn|mlp)"])
BF16 = fi.ProjectionConfig(rank_in=4, rank_out=4, autocast="bfloat16")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def examples():
    return make_examples(N, seed=5, min_len=3, max_len=20)


def plain(examples, size=4):
    n = len(examples)
    return [collate(examples[s : s + size], ids=IDS[s : min(s + size, n)]) for s in range(0, n, size)]


def bucketed(examples, **kw):
    """Batches by length (longest first within each window), each with its examples' data positions."""
    plan = length_batches([len(i) for i, _ in examples], **kw)
    assert any(idx != sorted(idx) or idx[0] != p[0] for idx, p in zip(plan, sorted(plan))), "plan must reorder"
    return [dict(collate([examples[i] for i in idx], ids=[IDS[i] for i in idx]), positions=idx) for idx in plan]


def assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-10


# ----------------------------------------------------------------------------- data order


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_kfac_scores_of_bucketed_batches_are_in_data_order(model, examples, method, metric):
    """The fit sees the same examples either way, so the factors agree; the columns (and rows) must too."""
    queries = examples[:5]
    with one_thread():
        ref = kfac_scores(model, plain(queries, 2), plain(examples), method=method, config=CONFIG, metric=metric)
        out = kfac_scores(
            model,
            bucketed(queries, batch_size=2),
            bucketed(examples, batch_size=3, window=None),
            method=method,
            config=CONFIG,
            metric=metric,
        )
    assert_same(out, ref)


def test_kfac_factors_of_bucketed_batches_equal_plain_ones(model, examples):
    with one_thread():
        ref = fit_kfac(model, plain(examples), "ekfac", CONFIG)
        out = fit_kfac(model, bucketed(examples, batch_size=None, max_tokens=45, window=6), "ekfac", CONFIG)
    assert (out.examples, out.tokens) == (ref.examples, ref.tokens)
    for key in ("e_A", "e_G", "Lambda"):
        for name in ref.shapes:
            assert_same(out.stats[f"{name}.{key}"], ref.stats[f"{name}.{key}"])


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_exact_scores_of_bucketed_batches_are_in_data_order(model, examples, metric):
    with one_thread():
        ref = fi.exact_scores(model, plain(examples[:4], 3), plain(examples), config=CONFIG, metric=metric)
        out = fi.exact_scores(
            model, bucketed(examples[:4], batch_size=2), bucketed(examples, batch_size=5), config=CONFIG, metric=metric
        )
    assert_same(out, ref)


def test_normalizer_fit_on_bucketed_batches_equals_plain(model, examples):
    with one_thread():
        ref = Normalizer.fit(model, plain(examples), CONFIG)
        out = Normalizer.fit(model, bucketed(examples, batch_size=3, window=5), CONFIG)
    for name, (r, c) in ref.factors.items():
        assert_same(out.factors[name][0], r)
        assert_same(out.factors[name][1], c)


def test_extraction_and_storeless_scores_of_bucketed_batches_are_in_data_order(model, examples):
    ext = fi.GradientExtractor(model, CONFIG)
    with one_thread():
        ref = ext.extract(plain(examples))
        out = ext.extract(bucketed(examples, batch_size=3, window=7))
        query = ext.extract(plain(examples[:3]))
        stored = fi.score(query, ref, topk=4)
        streamed = fi.score_batches(ext, query, bucketed(examples, batch_size=3, window=7), topk=4)
    assert out.ids == ref.ids == IDS
    assert_same(out.data, ref.data)
    assert streamed.train_ids == IDS and torch.equal(streamed.topk_indices, stored.topk_indices)
    assert_same(streamed.topk_values, stored.topk_values)


# ----------------------------------------------------------------------------- checks every entry point gets


def _entry_points(model, batches, config=CONFIG):
    """Every public way into the capture pass, called on ``batches`` as train (and fit) data."""
    query = plain(make_examples(2, seed=9))
    return {
        "extract": lambda: fi.GradientExtractor(model, config).extract(batches),
        "exact_scores": lambda: fi.exact_scores(model, query, batches, config=config),
        "fit_kfac": lambda: fit_kfac(model, batches, "kfac", config),
        "kfac_scores": lambda: kfac_scores(model, query, batches, "kfac", fit_batches=query, config=config),
        "Normalizer.fit": lambda: Normalizer.fit(model, batches, config),
    }


@pytest.mark.parametrize("entry", ["extract", "exact_scores", "fit_kfac", "kfac_scores", "Normalizer.fit"])
def test_every_entry_point_checks_token_ids_against_the_vocabulary(model, entry):
    bad = collate(make_examples(2, seed=3), ids=["a", "b"])
    bad["input_ids"][1, 1] = VOCAB + 7
    with pytest.raises(ValueError, match=r"examples \['b'\] hold token ids outside 0..63"):
        _entry_points(model, [bad])[entry]()


@pytest.mark.parametrize("entry", ["extract", "exact_scores", "fit_kfac", "kfac_scores", "Normalizer.fit"])
def test_every_entry_point_runs_its_forward_under_the_configured_autocast(entry, monkeypatch):
    model = tiny_model("llama", dtype=torch.float32)
    seen = []
    real = capture_module.autocast_forward

    def spy(device, dtype):
        seen.append(dtype)
        return real(device, dtype)

    monkeypatch.setattr(capture_module, "autocast_forward", spy)
    with one_thread():
        _entry_points(model, plain(make_examples(3, seed=4)), BF16)[entry]()
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("entry", ["extract", "exact_scores", "fit_kfac", "kfac_scores", "Normalizer.fit"])
def test_every_entry_point_refuses_autocast_on_a_model_that_is_not_float32(model, entry):
    with pytest.raises(ValueError, match="needs a float32 model"):
        _entry_points(model, plain(make_examples(3, seed=4)), BF16)[entry]()


def test_the_model_is_left_as_it_was_found_between_batches(model, examples):
    """Consumers may hand results on between batches (a store writer, a caller's loop): the model is
    frozen for each batch's forward and backward only."""
    flags = [p.requires_grad for p in model.parameters()]
    capture = CapturePass(model, CONFIG)
    for step in capture.batches(plain(examples)):
        capture.backward(step.batch, lambda *a: None)
        assert [p.requires_grad for p in model.parameters()] == flags


# ----------------------------------------------------------------------------- written once

ROOT = Path(__file__).resolve().parents[1] / "fastinfluence"
# Names that run a forward + backward with hooks or walk raw batches: only the capture module
# (and the training callback, whose hooks sit on the Trainer's own step) may use them.
PASS_INTERNALS = {"LayerHooks", "frozen_for_capture", "iter_batches", "forward_losses"}
ALLOWED = {"capture.py": PASS_INTERNALS, "callback.py": {"LayerHooks"}, "weights.py": {"forward_losses"}}


def test_the_capture_pass_is_written_once():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED.get(rel, set())
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in PASS_INTERNALS and name not in allowed and rel != "batching.py":
                offenders.append(f"{rel}:{node.lineno} {name}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- progress


def test_store_progress_moves_per_batch_inside_a_window(model, examples, tmp_path, monkeypatch):
    """A window of length-bucketed batches is written once complete, but the bar counts each batch's
    examples as it is computed (it used to stay at 0 until the window closed)."""
    from fastinfluence.store import writer as writer_module

    updates = []
    monkeypatch.setattr(writer_module.StoreWriter, "advance", lambda self, n: updates.append(n))
    batches = bucketed(examples, batch_size=3, window=None)  # one window: every row is written at the end
    fi.GradientExtractor(model, CONFIG).extract(batches, store=tmp_path / "s")
    assert updates == [len(b["input_ids"]) for b in batches]


def test_in_memory_extraction_and_scores_show_example_counts(model, examples, capsys):
    with one_thread():
        fi.GradientExtractor(model, CONFIG).extract(plain(examples), progress=True)
        fi.exact_scores(model, plain(examples[:2]), plain(examples), config=CONFIG, progress=True)
        fit_kfac(model, plain(examples), "ekfac", CONFIG, progress=True)
    err = capsys.readouterr().err
    for bar in ("extract", "queries", "train", "K-FAC factors", "EK-FAC eigenvalues"):
        assert f"{bar}: 100%" in err or f"{bar}: {N}ex" in err or f"{bar}: 2ex" in err, (bar, err[-500:])


def test_a_kfac_fit_on_fewer_tokens_than_a_layer_is_wide_warns(model):
    few = plain(make_examples(2, seed=1, min_len=5, max_len=6))  # ~11 tokens; the MLP layers are 48 wide
    with pytest.warns(UserWarning, match=r"K-FAC fit on 2 examples \(\d+ attended tokens\) for layers up to 48 wide"):
        fit_kfac(model, few, "kfac", CONFIG)
