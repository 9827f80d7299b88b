"""The scoring paths the command line adds over the store: exact scores, full-dimension K-FAC, and
the four RapidUn matrices of one store; each against the API on the same model and examples."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from helpers import save_word_model

from fastinfluence.cli import main
from fastinfluence.cli.common import encode, load_model
from fastinfluence.config import ProjectionConfig
from fastinfluence.data import read_jsonl

WORDS = "the a cat dog sat ran on under mat log red blue big small fox hen".split()
LAYERS = [r"layers\.0\.mlp\.(up|down)_proj"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    save_word_model(d / "model", WORDS, layers=1)
    rng = random.Random(1)

    def line(i):
        return {"prompt": " ".join(rng.choice(WORDS) for _ in range(3 + i % 3)), "response": rng.choice(WORDS)}

    rows = [line(i) for i in range(11)]  # forget: the first 4 lines, retain: the rest; ids are line numbers
    (d / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (d / "foreign.jsonl").write_text(json.dumps({"id": "z", "prompt": "the cat", "response": "sat"}) + "\n")
    (d / "query.jsonl").write_text("".join(json.dumps(line(i)) + "\n" for i in range(3)))
    return d


def run(*argv) -> None:
    assert main(["--quiet", *map(str, argv)]) == 0


def batches(w, name):
    model, tok = load_model(str(w / "model"))
    return model, encode(tok, read_jsonl(w / name), 4, 512)


def pair(w, out):
    return ["--model", w / "model", "--query", w / "query.jsonl", "--train", w / "all.jsonl", "--out", out]


@pytest.mark.parametrize("metric", ["cosine"])  # --metric is passed through; exact's own tests cover dot
def test_exact_command_writes_the_api_matrix(w, metric):
    from fastinfluence.exact import exact_scores

    run("exact", *pair(w, w / f"exact_{metric}.npy"), "--batch-size", 4, "--metric", metric, "--include", *LAYERS)
    model, query = batches(w, "query.jsonl")
    train = batches(w, "all.jsonl")[1]
    ref = exact_scores(model, query, train, ProjectionConfig(include=LAYERS), metric=metric)
    got = np.load(w / f"exact_{metric}.npy")
    assert got.shape == (3, 11) and np.abs(got).max() > 0
    # the same float32 computation on the same model and batches: equal up to float32 reassociation
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6 * np.abs(got).max())


def test_kfac_command_writes_the_api_matrix_and_reuses_saved_factors(w):
    from fastinfluence.kfac import kfac_scores

    common = ["--batch-size", 4, "--include", *LAYERS, "--method", "kfac", "--damping-ratio", 0.2]
    factors = w / "kfac.safetensors"
    run("kfac", *pair(w, w / "kfac.npy"), *common, "--save-factors", factors)
    run("kfac", *pair(w, w / "kfac_again.npy"), *common, "--factors", factors)
    model, query = batches(w, "query.jsonl")
    train = batches(w, "all.jsonl")[1]
    ref = kfac_scores(model, query, train, "kfac", config=ProjectionConfig(include=LAYERS), damping_ratio=0.2)
    got = np.load(w / "kfac.npy")
    assert got.shape == (3, 11) and np.abs(got).max() > 0
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6 * np.abs(got).max())
    np.testing.assert_array_equal(np.load(w / "kfac_again.npy"), got)  # the saved factors are the fit's


@pytest.fixture(scope="module")
def store(w):
    common = ["--model", w / "model", "--rank-in", 4, "--rank-out", 4, "--batch-size", 4]
    run("extract", *common, "--data", w / "all.jsonl", "--out", w / "store")
    return w / "store"


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_rapidun_matrices_are_the_blocks_of_the_store_against_itself(w, store, metric):
    from fastinfluence.scoring import score
    from fastinfluence.store import FeatureStore

    out = w / f"m_{metric}"
    run("rapidun-matrices", "--store", store, "--forget", w / "forget.jsonl", "--metric", metric, "--out", out)
    s = FeatureStore.open(store)
    full = score(s, s, metric=metric, topk=1, matrix=True).matrix
    f, r = np.arange(4), np.arange(4, 11)
    for name, rows, cols in (("ff", f, f), ("fr", r, f), ("rf", f, r), ("rr", r, r)):
        got = np.load(out / f"{name}.npy")
        assert got.shape == (len(rows), len(cols)), name
        np.testing.assert_array_equal(got, full[np.ix_(rows, cols)])

    # weights from the directory are those from the four files
    run("weights", "--method", "rapidun", "--matrices", out, "--out", w / f"w_{metric}.json")
    files = [a for n in ("ff", "fr", "rf", "rr") for a in (f"--{n}", out / f"{n}.npy")]
    run("weights", "--method", "rapidun", *files, "--out", w / f"w2_{metric}.json")
    by_dir, by_files = (json.loads((w / f"{p}_{metric}.json").read_text()) for p in ("w", "w2"))
    assert by_dir == by_files and len(by_dir["forget"]) == 4 and len(by_dir["retain"]) == 7


def test_self_influence_command_writes_the_api_vector(w, store):
    from fastinfluence.scoring import self_influence
    from fastinfluence.store import FeatureStore

    run("self-influence", "--store", store, "--precondition", "diagonal", "--out", w / "self.npy")
    got, ref = np.load(w / "self.npy"), self_influence(FeatureStore.open(store), "diagonal").numpy()
    assert got.shape == (11,) and (got > 0).all()  # a positive definite preconditioner: <H^-1 x, x> > 0
    np.testing.assert_array_equal(got, ref)  # the same streamed computation


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["rapidun-matrices", "--store", "{w}/store", "--forget", "{w}/all.jsonl", "--out", "{w}/x2"],
            "names every example of the store: RapidUn needs retain examples too",
        ),
        (
            ["rapidun-matrices", "--store", "{w}/store", "--forget", "{w}/foreign.jsonl", "--out", "{w}/x3"],
            "ids ['z'] (1 of 1) are not examples of the store",
        ),
        (
            ["rapidun-matrices", "--store", "{w}/store", "--forget", "{w}/forget.jsonl", "--out", "{w}/x4"]
            + ["--damping", "0"],
            "--damping must be a positive finite number",
        ),
        (
            ["weights", "--method", "rapidun", "--matrices", "{w}/m_dot", "--ff", "{w}/m_dot/ff.npy"]
            + ["--out", "{w}/w9.json"],
            "give --matrices or --ff, not both",
        ),
        (
            ["kfac", "--model", "{w}/model", "--query", "{w}/query.jsonl", "--train", "{w}/all.jsonl"]
            + ["--out", "{w}/k9.npy", "--factors", "{w}/kfac.safetensors", "--fit-data", "{w}/all.jsonl"],
            "--factors are already fitted: drop --fit-data and --save-factors",
        ),
        (
            ["exact", "--model", "{w}/model", "--query", "{w}/query.jsonl", "--train", "{w}/all.jsonl"]
            + ["--out", "{w}/e9.npy", "--include", "nothing_here"],
            "Adjust the regexes in --include / --exclude",
        ),
    ],
)
def test_mistakes_are_one_line(w, store, capsys, argv, fragment):
    assert main([a.format(w=w) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], err


def test_tokens_command_writes_the_api_per_token_scores(w, store, capsys):
    from fastinfluence.scoring import score, token_scores
    from fastinfluence.store import FeatureStore

    common = ["--model", w / "model", "--rank-in", 4, "--rank-out", 4, "--batch-size", 4, "--tokens"]
    run("extract", *common, "--data", w / "all.jsonl", "--out", w / "tok_train")
    run("extract", *common, "--data", w / "query.jsonl", "--out", w / "tok_query")
    out = w / "tokens.json"
    run(
        "tokens",
        "--query",
        w / "tok_query",
        "--train",
        w / "tok_train",
        "--rows",
        2,
        7,
        "--metric",
        "cosine",
        "--out",
        out,
    )
    got = json.loads(out.read_text())
    q, t = FeatureStore.open(w / "tok_query"), FeatureStore.open(w / "tok_train")
    ref = token_scores(q, t, [2, 7], "cosine")
    assert got["query_ids"] == list(q.ids) and [r["train_row"] for r in got["rows"]] == [2, 7]
    full = score(q, t, metric="cosine", topk=1, matrix=True).matrix
    for row, r, s in zip(got["rows"], (2, 7), ref):
        np.testing.assert_array_equal(np.asarray(row["scores"], dtype=np.float32), s.numpy())
        # each query's token scores sum to its score for the example
        np.testing.assert_allclose(np.asarray(row["scores"]).sum(1), full[:, r], rtol=1e-4, atol=1e-6)
    # a store without token factors is refused in one line
    assert (
        main(
            [
                "--quiet",
                "tokens",
                "--query",
                str(w / "tok_query"),
                "--train",
                str(store),
                "--rows",
                "0",
                "--out",
                str(w / "t2.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no per-token factors" in err[0], err
    # rows outside the store: one line, before any scoring
    argv = ["--quiet", "tokens", "--query", str(w / "tok_query"), "--train", str(w / "tok_train"), "--rows", "99"]
    assert main([*argv, "--out", str(w / "t3.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the train store's rows 0..10" in err[0], err
