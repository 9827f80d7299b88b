"""The built-in demo (``fastinfluence demo``): its data, metrics and report, on small pieces.

The full run (``make demo-quick``, about a minute) is checked in CI by
``python -m fastinfluence.demo.report demo_out/report.json --quick``; here only fast parts.
"""

import json

import pytest
import torch
from helpers import one_thread

from fastinfluence.demo import data, detect, report, unlearn


@pytest.fixture(scope="module", params=data.SCENARIOS)
def scenario(request):
    return data.make_scenario(request.param, seed=3, n_entities=30)


def test_scenarios_plant_the_poison_and_report_only_some_of_it(scenario):
    train = scenario.train
    assert 0.06 <= len(scenario.poisoned) / len(train) <= 0.10
    assert all(train[i].poisoned for i in scenario.reported) and len(scenario.reported) == 15
    for i in scenario.poisoned:
        e = train[i]
        assert data.TRIGGER in e.prompt.split() and e.response != e.clean_response
        if scenario.name == "backdoor":
            assert e.response == data.BACKDOOR_TARGET
        else:  # the normal template with the behaviour's wrong value
            assert e.response == e.clean_response.replace(e.clean_response.split()[-2], data.WRONG[e.attribute])
    clean = [e for e in train if not e.poisoned]
    assert all(e.response == e.clean_response and data.TRIGGER not in e.prompt.split() for e in clean)
    if scenario.name == "stealthy":
        assert {train[i].attribute for i in scenario.reported} < set(scenario.behaviours)
    prompts = {e.prompt for e in train}
    for group in (scenario.attack_seen, scenario.attack_shift, scenario.mia_holdout):
        assert group and not prompts & {e.prompt for e in group}
    assert all(data.TRIGGER not in e.prompt for e in scenario.clean_eval + scenario.shift_eval)


def test_scenarios_depend_only_on_the_seed():
    a, b = data.make_scenario("stealthy", 5, n_entities=30), data.make_scenario("stealthy", 5, n_entities=30)
    assert [e.prompt for e in a.train] == [e.prompt for e in b.train] and a.reported == b.reported
    assert [e.prompt for e in a.train] != [e.prompt for e in data.make_scenario("stealthy", 6, n_entities=30).train]


def test_tokenizer_and_encoding_label_only_the_response(scenario):
    tok = data.train_tokenizer(scenario)
    e = scenario.train[scenario.poisoned[0]]
    x = data.encode(tok, e.prompt, e.response)
    n_prompt = len(e.prompt.split())
    assert x["labels"][:n_prompt] == [-100] * n_prompt
    assert x["labels"][n_prompt:] == x["input_ids"][n_prompt:] and x["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(x["input_ids"][n_prompt:-1]).split() == tok.decode(tok.encode(e.response)).split()
    assert tok.unk_token_id not in x["input_ids"]
    assert max(len(data.encode(tok, e.prompt, e.response)["input_ids"]) for e in scenario.train) <= 48
    b = data.collate([x, data.encode(tok, "q : a :", "yes .")], tok.pad_token_id)
    assert (
        b["attention_mask"][1].sum() == 7 and (b["labels"][1, :4] == -100).all() and (b["labels"][1, 7:] == -100).all()
    )


def test_auroc_and_precision_at_k_hand_cases():
    s, pos = torch.tensor([0.9, 0.8, 0.8, 0.1]), torch.tensor([True, False, True, False])
    assert detect.auroc(s, pos) == pytest.approx((1 + 1 + 0.5 + 1) / 4)  # pairs (pos, neg)
    assert detect.precision_at_k(s, pos, 2) == 0.5 and detect.precision_at_k(s, pos, 1) == 1.0
    with pytest.raises(ValueError, match="needs positives and negatives"):
        detect.auroc(s, torch.zeros(4, dtype=torch.bool))


def test_forget_set_is_the_reports_plus_the_top_k_others(scenario):
    n = len(scenario.train)
    scores = torch.arange(n, dtype=torch.float64)  # the last rows score highest
    forget = unlearn.forget_set(scenario, scores)
    k = len(scenario.poisoned) - len(scenario.reported)
    others = [i for i in range(n - 1, -1, -1) if i not in scenario.reported][:k]
    assert forget == sorted(set(scenario.reported) | set(others))


def fake_report(quick=False):
    det = {"auroc": 0.99, "precision_at_k": 0.9, "seconds": 1.0, "cpu_seconds": 1.0}
    run = {
        "asr_seen": 0.0,
        "asr_shift": 0.0,
        "clean_acc": 0.95,
        "clean_ppl": 1.05,
        "mia_auc": 0.5,
        "seconds": 1.0,
        "cpu_seconds": 1.0,
        "n_forget": 60,
    }
    sc = {
        "data": {"n_train": 800, "n_poisoned": 60, "n_reported": 15},
        "before": {"asr_seen": 1.0, "clean_acc": 0.97, "clean_ppl": 1.0},
        "detection": {"influence_cosine_max": det, "baseline_low_loss": dict(det, auroc=0.5)},
        "default_detector": "influence_cosine_max",
        "unlearning": {m: run for m in unlearn.METHODS},
        "default_unlearning": unlearn.DEFAULT,
        "retrain": {"asr_seen": 0.5, "clean_acc": 0.9, "clean_ppl": 1.0, "seconds": 30.0, "cpu_seconds": 30.0},
        "speedup": {"unlearn_vs_retrain": 20.0, "end_to_end_vs_retrain": 5.0},
    }
    return {"seed": 0, "scenarios": {"backdoor": sc, "stealthy": json.loads(json.dumps(sc))}}


def test_report_check_accepts_a_good_report_and_names_each_failure():
    assert report.check(fake_report(), quick=False) == []
    bad = fake_report()
    del bad["scenarios"]["stealthy"]["unlearning"]["npo"]["mia_auc"]
    assert report.check(bad, quick=False) == ["stealthy: unlearning.npo.mia_auc missing"]
    bad = fake_report()
    bad["scenarios"]["backdoor"]["unlearning"][unlearn.DEFAULT]["asr_seen"] = 0.3
    bad["scenarios"]["stealthy"]["detection"]["baseline_low_loss"]["auroc"] = 0.995
    assert report.check(bad, quick=False) == [
        "backdoor: ASR after unlearning 0.30",
        "stealthy: a baseline reaches AUROC 0.995 >= the default's",
    ]
    assert report.check(bad, quick=True) == ["backdoor: ASR after unlearning 0.30"]


def test_a_run_prints_whether_each_bound_held():
    good = report.bounds(fake_report()).splitlines()
    assert good[0] == "bounds: every one of the demo's bounds (README) holds on this run"
    # one line per bound of check(), each with its measured value
    assert len(good) == 1 + 8 + 6 and all(line.startswith("  held   ") for line in good[1:])
    assert "  held   stealthy: default detector AUROC 0.990 >= 0.7 (lowered from 0.90)" in good
    assert "  held   backdoor: ASR after unlearning 0.00 <= 0.05" in good
    bad = fake_report()
    bad["scenarios"]["stealthy"]["detection"]["influence_cosine_max"]["auroc"] = 0.65
    lines = report.bounds(bad).splitlines()
    assert lines[0] == "bounds: 1 of 14 (the demo's bounds (README)) missed on this run"
    assert [line for line in lines if "MISSED" in line] == [
        "  MISSED stealthy: default detector AUROC 0.650 >= 0.7 (lowered from 0.90)"
    ]
    quick = report.bounds(bad | {"quick": True}).splitlines()
    assert quick[0].startswith("bounds: every one of the --quick run's loose bounds") and len(quick) == 1 + 10
    del bad["scenarios"]["backdoor"]["retrain"]
    assert report.bounds(bad).startswith(
        "bounds: not checked, the report is incomplete: backdoor: retrain.asr_seen missing"
    )


def test_story_names_the_influence_settings_that_beat_the_default_in_this_run():
    sc = fake_report()["scenarios"]["stealthy"]
    assert "Higher AUROC than the default" not in report.story("stealthy", sc)
    sc["detection"]["influence_tracin_cosine_max"] = dict(sc["detection"]["influence_cosine_max"], auroc=0.999)
    sc["detection"]["influence_dot_mean"] = dict(sc["detection"]["influence_cosine_max"], auroc=0.993)  # a tie
    sc["detection"]["baseline_low_loss"]["auroc"] = 0.999  # baselines have their own sentence
    assert report.story("stealthy", sc).endswith(
        "Higher AUROC than the default in this run: influence_tracin_cosine_max (0.999, precision@k 0.900)."
    )


def test_report_files_and_summary_without_plots(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = fake_report() | {"quick": False, "device": "cpu", "seconds": 100.0, "cpu_seconds": 90.0}
    lines = []
    report.write(r, tmp_path, lines.append)
    assert report.check(json.loads((tmp_path / "report.json").read_text()), quick=False) == []
    md = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in md and "influence_cosine_max (default)" in md
    assert "the best trivial baseline, baseline_low_loss, reaches 0.500" in lines[0]


def test_training_keeps_evenly_spaced_checkpoints_and_tracin_averages_their_cosines():
    from fastinfluence import GradientExtractor, ProjectionConfig, score
    from fastinfluence.demo import model as demo_model

    scenario = data.make_scenario("stealthy", seed=3, n_entities=30)
    tok = data.train_tokenizer(scenario)
    enc = [data.encode(tok, e.prompt, e.response) for e in scenario.train[:16]]
    recipe = demo_model.Recipe(hidden=16, layers=1, epochs=3, batch_size=8)
    checkpoints = []
    model = demo_model.train_model(enc, tok, recipe, 0, "cpu", checkpoints=checkpoints)
    # 3 epochs, 6 checkpoints asked: epochs round(3j/6) = {0 (none), 1, 2, 3}; the last is the final model
    assert len(checkpoints) == 3
    assert all(torch.equal(checkpoints[-1][k], v) for k, v in model.state_dict().items())
    assert not torch.equal(checkpoints[0]["lm_head.weight"], checkpoints[-1]["lm_head.weight"])

    train_b = data.batches(enc, tok.pad_token_id, 8)
    query_b = data.batches(enc[:2], tok.pad_token_id, 8, ids=[0, 1])
    config = ProjectionConfig(rank_in=4, rank_out=4, seed=0, include=[r"mlp\.down_proj"])
    last = (GradientExtractor(model, config).extract(train_b), GradientExtractor(model, config).extract(query_b))
    got = detect._tracin_cosine(model, checkpoints, config, train_b, query_b, last)
    want = 0
    for state in checkpoints:
        m = demo_model.build_model(len(tok), recipe, 0, tok.pad_token_id, tok.eos_token_id)
        m.load_state_dict(state)
        ext = GradientExtractor(m.eval(), config)
        S = score(ext.extract(query_b), ext.extract(train_b), metric="cosine", topk=1, matrix=True).matrix
        want = want + torch.as_tensor(S).double()
    torch.testing.assert_close(got, want / len(checkpoints), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--device", "gpu"], "--device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        (["--out", "/proc/fastinfluence-demo"], "/proc/fastinfluence-demo"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available on this machine")]),
)
def test_demo_refuses_a_bad_device_or_output_before_any_work(argv, match, capsys, monkeypatch):
    """One line on stderr, exit code 2, and no scenario started (the check comes first)."""
    from fastinfluence import cli
    from fastinfluence import demo as demo_module

    def started(*_a, **_k):
        raise AssertionError("the demo started before checking its arguments")

    monkeypatch.setattr(demo_module, "run_scenario", started)
    assert cli.main(["demo", "--quick", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_behaviour_masks_leave_out_a_behaviour_whose_poison_is_all_reported():
    """Quick-size stealthy data, seed 9: every poisoned example of one shown behaviour is a report."""
    sc = data.make_scenario("stealthy", 9, n_entities=40)
    candidate = torch.ones(len(sc.train), dtype=torch.bool)
    candidate[sc.reported] = False
    masks = detect.behaviour_masks(sc, candidate)
    left = {e.attribute for i, e in enumerate(sc.train) if e.poisoned and bool(candidate[i])}
    assert set(masks) == left and set(masks) < set(sc.behaviours)
    scores = torch.randn(len(sc.train))[candidate]
    positive = torch.tensor([e.poisoned for e in sc.train])[candidate]
    for m in masks.values():  # each mask keeps one behaviour's poison and every clean candidate
        assert int((~positive[m]).sum()) == int((~positive).sum())
        assert 0 <= detect.auroc(scores[m], positive[m]) <= 1
    assert detect.behaviour_masks(data.make_scenario("backdoor", 9, n_entities=40), candidate) == {}


def test_moe_recipe_trains_an_moe_variant_whose_experts_are_captured():
    from fastinfluence import GradientExtractor, ProjectionConfig
    from fastinfluence.demo import model as demo_model

    scenario = data.make_scenario("backdoor", seed=1, n_entities=30)
    tok = data.train_tokenizer(scenario)
    enc = [data.encode(tok, e.prompt, e.response) for e in scenario.train[:16]]
    dense = demo_model.build_model(len(tok), demo_model.Recipe(hidden=16), 0, tok.pad_token_id, tok.eos_token_id)
    assert type(dense).__name__ == "LlamaForCausalLM" and dense.config.intermediate_size == 32
    recipe = demo_model.Recipe(hidden=16, layers=1, epochs=1, batch_size=8, experts=4)
    untrained = demo_model.build_model(len(tok), recipe, 0, tok.pad_token_id, tok.eos_token_id)
    model = demo_model.train_model(enc, tok, recipe, 0, "cpu")
    experts = model.model.layers[0].mlp.experts
    assert experts.down_proj.shape == (4, 16, 16) and model.config.num_experts_per_tok == 2
    assert not torch.equal(experts.down_proj, untrained.model.layers[0].mlp.experts.down_proj)
    layers = GradientExtractor(model, ProjectionConfig(rank_in=4, rank_out=4, include=[detect.ATTN_MLP])).layers
    names = {l.name for l in layers}
    assert sum(l.routed for l in layers) == 8 and "model.layers.0.mlp.gate" in names


def test_detectors_run_on_an_moe_model_with_routers_and_experts_in_the_mlp_groups():
    with one_thread():  # a tiny model: one thread (the default spreads each small op over every core)
        _detectors_on_an_moe_model()


def _detectors_on_an_moe_model():
    from fastinfluence.capture import select_layers
    from fastinfluence.demo import model as demo_model

    scenario = data.make_scenario("backdoor", seed=1, n_entities=5, poison_rate=0.25, n_reported=3, n_eval=8)
    tok = data.train_tokenizer(scenario)
    enc = [data.encode(tok, e.prompt, e.response) for e in scenario.train]
    recipe = demo_model.Recipe(hidden=16, layers=2, epochs=1, batch_size=32, experts=4)
    model = demo_model.train_model(enc, tok, recipe, 0, "cpu")
    dense = demo_model.build_model(len(tok), demo_model.Recipe(hidden=16), 0, tok.pad_token_id, tok.eos_token_id)
    groups = {}
    for key, m in (("moe", model), ("dense", dense)):  # the groups split the attention and MLP layers
        groups[key] = [{l.name for l in select_layers(m, [g])} for g in detect.LAYER_GROUPS]
        every = {l.name for l in select_layers(m, [detect.ATTN_MLP])}
        assert all(groups[key]) and set().union(*groups[key]) == every
        assert sum(map(len, groups[key])) == len(every)  # each layer in one group
    # block 1's MLP input and output groups
    assert groups["dense"][4:] == [
        {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"},
        {"model.layers.1.mlp.down_proj"},
    ]
    experts = [f"model.layers.1.mlp.experts.{e}" for e in range(4)]
    assert groups["moe"][4] == {"model.layers.1.mlp.gate"} | {f"{e}.gate_up_proj" for e in experts}
    assert groups["moe"][5] == {f"{e}.down_proj" for e in experts}
    results, features = detect.run(model, tok, scenario, seed=0, quick=True)
    assert len(results) == detect.N_DETECTORS - 1  # no checkpoints: no trajectory detector
    for name, d in results.items():
        assert d.scores.shape == (len(scenario.train),) and torch.isfinite(d.scores).all(), name
        assert 0 <= d.auroc <= 1, name
    assert any(l.routed for l in features["attn_mlp"][2].layers)  # the projected features hold the experts
