"""The command line: extract and score on a local model directory, a PEFT adapter and JSONL files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from helpers import save_word_model

from fastinfluence.cli import build_parser, main
from fastinfluence.scoring import score
from fastinfluence.store import FeatureStore

WORDS = "the a cat dog sat ran on under mat log red blue big small fox hen".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_word_model(tmp_path_factory.mktemp("model"), WORDS, layers=1)


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import random

    rng = random.Random(0)
    d = tmp_path_factory.mktemp("data")
    train = [{"id": f"t{i}", "prompt": sentence(rng, 4), "response": sentence(rng, 3)} for i in range(10)]
    query = [
        {"id": "q0", **{k: train[6][k] for k in ("prompt", "response")}},
        {"id": "q1", **{k: train[2][k] for k in ("prompt", "response")}},
    ]
    for name, rows in (("train", train), ("query", query)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(*argv):
    assert main(["--quiet", *map(str, argv)]) == 0


@pytest.fixture(scope="module")
def stores(model_dir, data, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    common = ["--model", model_dir, "--rank-in", 8, "--rank-out", 8, "--batch-size", 3, "--shard-rows", 4]
    run("extract", *common, "--data", data / "train.jsonl", "--out", d / "train", "--covariances")
    run("extract", *common, "--data", data / "query.jsonl", "--out", d / "query")
    return d


def test_extract_writes_a_store_of_every_jsonl_example(stores, data):
    store = FeatureStore.open(stores / "train")
    store.verify()
    assert store.ids == [f"t{i}" for i in range(10)]
    assert store.config.rank_in == 8 and store.has_covariances
    assert store.meta["data"] == str((data / "train.jsonl").resolve())


def test_score_writes_json_topk_with_texts_equal_to_the_api(stores, data, tmp_path):
    out = tmp_path / "top.json"
    run(
        "score",
        "--query",
        stores / "query",
        "--train",
        stores / "train",
        "--metric",
        "cosine",
        "--topk",
        3,
        "--out",
        out,
    )
    got = json.loads(out.read_text())
    ref = score(FeatureStore.open(stores / "query"), FeatureStore.open(stores / "train"), metric="cosine", topk=3)
    train = {json.loads(l)["id"]: json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()}
    for q, entry in enumerate(got["queries"]):
        assert [t["train_id"] for t in entry["top"]] == ref.topk_ids[q]
        assert [t["score"] for t in entry["top"]] == pytest.approx(ref.topk_values[q].tolist(), rel=1e-6)
        assert all(t["train_prompt"] == train[t["train_id"]]["prompt"] for t in entry["top"])
    # each query is a copy of one train example: identical gradients, cosine 1, ranked first
    assert [e["top"][0]["train_id"] for e in got["queries"]] == ["t6", "t2"]
    assert got["queries"][0]["top"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_score_of_a_jsonl_query_with_kfac_writes_csv_equal_to_a_query_store(stores, data, model_dir, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    run(
        "score",
        "--query",
        data / "query.jsonl",
        "--model",
        model_dir,
        "--train",
        stores / "train",
        "--precondition",
        "kfac",
        "--topk",
        4,
        "--out",
        a,
    )
    run(
        "score",
        "--query",
        stores / "query",
        "--train",
        stores / "train",
        "--precondition",
        "kfac",
        "--topk",
        4,
        "--out",
        b,
    )
    rows_a, rows_b = list(csv.DictReader(a.open())), list(csv.DictReader(b.open()))
    assert len(rows_a) == 8
    assert [r["train_id"] for r in rows_a] == [r["train_id"] for r in rows_b]
    assert rows_a[0]["query_prompt"] and rows_a[0]["train_response"]


def test_extract_from_a_peft_adapter_captures_the_lora_layers(model_dir, data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    run(
        "extract",
        "--model",
        tmp_path / "adapter",
        "--data",
        data / "query.jsonl",
        "--out",
        tmp_path / "s",
        "--rank-in",
        4,
        "--rank-out",
        4,
    )
    layers = list(FeatureStore.open(tmp_path / "s").layout)
    assert layers and all("lora" in n for n in layers)


def test_bad_jsonl_is_reported_with_its_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"text": "no fields"}\n')
    assert main(["extract", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "line 2: each example must be an object with 'prompt' and 'response'" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="line 2: .*'prompt' and 'response'"):  # --debug: the exception itself
        main(["extract", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "s"), "--debug"])


def test_every_option_of_extract_and_score_is_explained():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("extract", "score"):
        for action in sub.choices[name]._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)


def test_python_dash_m_is_the_same_program():
    out = subprocess.run([sys.executable, "-m", "fastinfluence", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "extract" in out.stdout and "score" in out.stdout


def test_help_and_version_import_neither_torch_nor_transformers():
    probe = (
        "import sys, contextlib, io\n"
        "from fastinfluence.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_public_names_are_listed_and_quiet_works_after_the_command(stores, tmp_path, capsys):
    import fastinfluence

    assert {"weights", "evaluate", "UnlearnTrainer", "data", "score", "FeatureStore"} <= set(dir(fastinfluence))
    out = tmp_path / "q.json"
    assert (
        main(
            ["score", "--query", str(stores / "query"), "--train", str(stores / "train"), "--out", str(out), "--quiet"]
        )
        == 0
    )
    assert out.exists() and "score:" not in capsys.readouterr().err  # no progress bar


@pytest.mark.parametrize(
    "module, attr, name",
    [
        ("fastinfluence.config", "STORAGE_DTYPES", "STORAGE_DTYPES"),
        ("fastinfluence.config", "KINDS", "PROJECTION_KINDS"),
        ("fastinfluence.config", "MODES", "MODES"),
        ("fastinfluence.scoring", "METRICS", "METRICS"),
        ("fastinfluence.precondition", "KINDS", "PRECONDITIONERS"),
        ("fastinfluence.weights", "AGGREGATES", "RAPIDUN_AGGREGATES"),
        ("fastinfluence.unlearn", "METHODS", "METHODS"),
        ("fastinfluence.losses", "REDUCTIONS", "REDUCTIONS"),
        ("fastinfluence.kfac", "METHODS", "KFAC_METHODS"),
        ("fastinfluence.exact", "METHODS", "EXACT_METHODS"),
    ],
)
def test_the_library_names_and_the_cli_choices_are_one_tuple(module, attr, name):
    import importlib

    from fastinfluence import options

    assert getattr(importlib.import_module(module), attr) is getattr(options, name)


def test_cli_defaults_are_the_options_defaults():
    from fastinfluence.cli.options import SCORE_FLAGS, UNLEARN_FLAGS, build
    from fastinfluence.options import ScoreOptions, UnlearnOptions

    args = build_parser().parse_args(["score", "--query", "q", "--train", "t", "--out", "o"])
    assert build(ScoreOptions, args, SCORE_FLAGS) == ScoreOptions()
    args = build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--out", "o"])
    assert build(UnlearnOptions, args, UNLEARN_FLAGS) == UnlearnOptions()
    args = build_parser().parse_args(
        ["score", "--query", "q", "--train", "t", "--out", "o", "--topk", "3", "--metric", "cosine"]
    )
    assert build(ScoreOptions, args, SCORE_FLAGS) == ScoreOptions(topk=3, metric="cosine")
    args = build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--out", "o", "--router-aux-loss"])
    assert build(UnlearnOptions, args, UNLEARN_FLAGS) == UnlearnOptions(router_aux_loss=True)


def test_extract_with_a_saved_normalizer_and_autocast_equals_the_api(model_dir, data, tmp_path, capsys):
    from fastinfluence import GradientExtractor, Normalizer, ProjectionConfig
    from fastinfluence.cli.common import encode, load_model
    from fastinfluence.data import read_jsonl

    model, tok = load_model(str(model_dir))
    batches = encode(tok, read_jsonl(data / "train.jsonl"), 3, 512)
    config = ProjectionConfig(rank_in=8, rank_out=8)
    norm = Normalizer.fit(model, batches, config)
    norm.save(tmp_path / "norm.safetensors")
    common = ["--model", model_dir, "--rank-in", 8, "--rank-out", 8, "--batch-size", 3, "--data", data / "train.jsonl"]
    run("extract", *common, "--out", tmp_path / "n", "--normalizer", tmp_path / "norm.safetensors")
    ref = GradientExtractor(model, config, normalizer=norm).extract(batches)
    got = FeatureStore.open(tmp_path / "n").to_features()
    assert got.ids == ref.ids and torch.allclose(got.data, ref.data, rtol=1e-5, atol=1e-7)
    plain = FeatureStore.open(tmp_path / "n")
    assert not torch.allclose(plain.to_features().data, GradientExtractor(model, config).extract(batches).data)

    run("extract", *common, "--out", tmp_path / "b", "--autocast", "bfloat16")
    bf16 = FeatureStore.open(tmp_path / "b")
    assert bf16.config.autocast == "bfloat16"
    auto = GradientExtractor(model, ProjectionConfig(rank_in=8, rank_out=8, autocast="bfloat16")).extract(batches)
    assert torch.allclose(bf16.to_features().data, auto.data, rtol=1e-5, atol=1e-7)

    bad = ["extract", *map(str, common), "--out", str(tmp_path / "x"), "--normalizer", str(tmp_path / "no")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"fastinfluence extract: error: --normalizer {tmp_path / 'no'}: no such file; "
        "write one with fastinfluence.Normalizer.save"
    ]


@pytest.mark.parametrize("version, keyword", [("4.45.1", "torch_dtype"), ("5.25.0", "dtype")])
def test_models_load_with_the_dtype_keyword_of_the_installed_transformers(model_dir, monkeypatch, version, keyword):
    import transformers

    from fastinfluence.cli.common import load_model

    calls, load = [], transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, **kwargs):  # records the keyword, loads with this environment's (5.x: dtype)
        calls.append(dict(kwargs))
        return load(path, dtype=kwargs.pop(keyword), **kwargs)

    monkeypatch.setattr(transformers, "__version__", version)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model, _ = load_model(str(model_dir), "bfloat16")
    assert calls[0][keyword] is torch.bfloat16 and model.dtype == torch.bfloat16
