"""The hand-off from scores to unlearning: one weights file, read the same way by the CLI's
``unlearn``, the demo and the open-unlearning trainers (same examples, same weights)."""

import json

import numpy as np
import open_unlearning_rendition as ou
import pytest
import torch
from helpers import VOCAB, save_word_model, tiny_model

from fastinfluence import weights
from fastinfluence.cli import main
from fastinfluence.cli.unlearn import examples_from_jsonl
from fastinfluence.demo import unlearn as demo_unlearn
from fastinfluence.integrations import open_unlearning as oul

WORDS = [f"w{i}" for i in range(40)]
NF, NR = 6, 5


class _Stop(Exception):
    """Raised by the recording dataset once the CLI has built its unlearning data."""


def _random_handoff(seed: int) -> weights.UnlearnWeights:
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(NF, generator=g)[:3].tolist())
    return weights.unlearn_weights(
        forget=torch.rand(NF, generator=g, dtype=torch.float64) + 0.1,
        retain=torch.rand(NR, generator=g, dtype=torch.float64) + 0.1,
        keep=keep,
        n_forget=NF,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("handoff")
    save_word_model(d / "model", WORDS)
    for name, n, first in (("forget", NF, 0), ("retain", NR, 20)):
        with open(d / f"{name}.jsonl", "w") as f:
            for i in range(n):  # every example its own words, so the kept ones can be told apart
                w = WORDS[first + 3 * i : first + 3 * i + 3]
                f.write(json.dumps({"prompt": f"{w[0]} {w[1]}", "response": w[2]}) + "\n")
    return d


def _cli_data(workdir, path, monkeypatch) -> dict:
    """What the CLI's ``unlearn`` hands to UnlearnDataset for the weights file ``path``."""
    import fastinfluence.unlearn as unlearn

    seen = {}

    class Recording(unlearn.UnlearnDataset):
        def __init__(self, forget, retain, **kw):
            super().__init__(forget, retain, **kw)
            seen["data"] = self
            raise _Stop

    monkeypatch.setattr(unlearn, "UnlearnDataset", Recording)
    argv = ["unlearn", "--model", str(workdir / "model"), "--forget", str(workdir / "forget.jsonl")]
    argv += ["--retain", str(workdir / "retain.jsonl"), "--weights", str(path), "--method", "graddiff"]
    with pytest.raises(_Stop):
        main([*argv, "--cpu", "--out", str(workdir / "never")])
    return seen["data"]


@pytest.mark.parametrize("seed", [0, 1])
def test_cli_demo_and_open_unlearning_unlearn_the_same_examples_with_the_same_weights(workdir, monkeypatch, seed):
    handoff = _random_handoff(seed)
    path = workdir / f"w{seed}.json"
    weights.save_weights(path, handoff, method="low_influence", threshold=0.5)
    loaded = weights.load_weights(path)
    keep = handoff.keep.tolist()
    assert 0 < len(keep) < NF

    # the CLI: the forget examples it keeps, by their tokens, and their weights
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    every = examples_from_jsonl(tok, str(workdir / "forget.jsonl"), 64)
    cli = _cli_data(workdir, path, monkeypatch)
    cli_keep = [next(i for i, e in enumerate(every) if e["input_ids"] == f["input_ids"]) for f in cli.forget]
    assert cli_keep == keep
    torch.testing.assert_close(cli.forget_weights, handoff.forget[keep], rtol=0, atol=0)
    torch.testing.assert_close(cli.retain_weights, handoff.retain, rtol=0, atol=0)

    # the demo: the same selection applied to its own examples
    demo, demo_keep = demo_unlearn.dataset([dict(e) for e in every], [dict(e) for e in every[:NR]], loaded, seed)
    assert demo_keep == keep and [f["input_ids"] for f in demo.forget] == [f["input_ids"] for f in cli.forget]
    torch.testing.assert_close(demo.forget_weights, cli.forget_weights, rtol=0, atol=0)
    torch.testing.assert_close(demo.retain_weights, cli.retain_weights, rtol=0, atol=0)

    # open-unlearning: its forget split holds the kept rows only; each batch's weights by its index
    forget, retain = ou.qa_items(NF, seed=1, vocab=VOCAB), ou.qa_items(NR, seed=2, vocab=VOCAB)
    trainer = _trainer(forget, retain, workdir, weights_path=str(path))
    split = trainer.train_dataset.forget
    assert len(trainer.train_dataset) == len(keep) and [split[i]["index"] for i in range(len(split))] == keep
    batch = ou.collator()([trainer.train_dataset[i] | {"retain": retain[i]} for i in range(len(keep))])
    torch.testing.assert_close(
        trainer._lookup(trainer.forget_weights, batch["forget"], "forget"), cli.forget_weights, rtol=0, atol=0
    )
    rows = ou.collator()(retain)
    torch.testing.assert_close(trainer._lookup(trainer.retain_weights, rows, "retain"), cli.retain_weights)
    assert len(forget) == NF  # the user's dataset is left whole


def _trainer(forget, retain, workdir, **method_args):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(workdir / "ou"),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        remove_unused_columns=False,
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    cls = oul.trainers(ou.UnlearnTrainer)["FIGradDiff"]
    return cls(
        model=tiny_model("llama", seed=3),
        train_dataset=ou.ForgetRetainDataset(forget, retain),
        data_collator=ou.collator(),
        args=args,
        **method_args,
    )


def test_every_file_the_weights_command_writes_loads(workdir):
    g = torch.Generator().manual_seed(4)
    ff, fr = torch.randn(3, NF, generator=g), torch.randn(2, NF, generator=g)
    rf, rr = torch.randn(3, NR, generator=g), torch.randn(2, NR, generator=g)
    for n, m in (("ff", ff), ("fr", fr), ("rf", rf), ("rr", rr)):
        np.save(workdir / f"{n}.npy", m.numpy())
    grads = torch.randn(NF, 8, generator=g)
    torch.save(grads, workdir / "grads.pt")
    runs = {
        "rapidun": [*(a for n in ("ff", "fr", "rf", "rr") for a in (f"--{n}", str(workdir / f"{n}.npy")))],
        "imu": ["--forget-grads", str(workdir / "grads.pt")],
        "low_influence": ["--scores", str(workdir / "ff.npy"), "--quantile", "0.5"],
    }
    for method, extra in runs.items():
        out = workdir / f"cmd_{method}.json"
        assert main(["weights", "--method", method, *extra, "--out", str(out), "--overwrite"]) == 0
        w = weights.load_weights(out)
        assert json.loads(out.read_text())["method"] == method
        if method == "rapidun":
            ref = weights.rapidun(ff, fr, rf, rr, rows="queries")
            torch.testing.assert_close(w.forget, ref.forget)
            torch.testing.assert_close(w.retain, ref.retain)
            assert w.keep is None
        elif method == "imu":
            torch.testing.assert_close(w.forget, weights.imu(grads).weights)
        else:
            low = weights.low_influence(ff, quantile=0.5, rows="queries")
            assert w.keep.tolist() == low.keep.tolist() and w.n_forget == NF and w.forget is None
            assert w.select(NF).keep == low.keep.tolist()


def test_vector_files_are_forget_weights(tmp_path):
    w = torch.rand(7, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
    np.save(tmp_path / "w.npy", w.numpy())
    torch.save(w.float(), tmp_path / "w.pt")
    for name in ("w.npy", "w.pt"):
        got = weights.load_weights(tmp_path / name)
        torch.testing.assert_close(got.forget, w.float(), rtol=0, atol=0)
        assert got.retain is None and got.keep is None and got.n_forget is None
    sel = weights.load_weights(tmp_path / "w.pt").select(7)
    assert sel.keep == list(range(7)) and torch.equal(sel.forget, w.float())


def test_save_and_load_round_trip_exactly(tmp_path):
    h = _random_handoff(7)
    weights.save_weights(tmp_path / "h.json", h, method="x")
    got = weights.load_weights(tmp_path / "h.json")
    for a, b in zip(got, h):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    with pytest.raises(ValueError, match="the weights' own keys"):
        weights.save_weights(tmp_path / "h2.json", h, keep=[1])


def _write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content)
    else:
        p.write_text(json.dumps(content))
    return p


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("w.txt", "1 2 3", r"give a \.json .* not \.txt"),
        ("w.json", "{not json", "is not valid JSON"),
        ("w.json", [1.0, 2.0], "holds none of 'forget', 'retain', 'keep'"),
        ("w.json", {"weights": [1.0]}, "holds none of 'forget', 'retain', 'keep'"),
        ("w.json", {"forget": [1.0, -0.5]}, "must be finite and non-negative"),
        ("w.json", {"forget": [[1.0], [2.0]]}, "must be a 1-D vector"),
        ("w.json", {"forget": ["a"]}, "must be a list of numbers"),
        ("w.json", {"keep": [0, 0], "n": 3}, "lists a forget example twice"),
        ("w.json", {"keep": [0.5], "n": 3}, "non-negative forget-example indices"),
        ("w.json", {"keep": None}, "'keep' is null"),
        ("w.json", {"keep": [0], "n": "3"}, "'n' must be the forget-set size"),
        ("w.json", {"keep": [0], "n": 4, "forget": [1.0, 2.0]}, "'keep' indexes 4 forget examples but 'forget' has 2"),
        ("w.npy", b"not numpy", r"cannot be read as \.npy"),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, name, content, match):
    with pytest.raises(ValueError, match=match) as e:
        weights.load_weights(_write(tmp_path, name, content))
    assert "\n" not in str(e.value)


def test_a_pt_file_of_another_object_and_a_missing_file_are_refused(tmp_path):
    torch.save({"forget": torch.ones(3)}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="must hold one \\(N,\\) tensor of forget weights, found dict"):
        weights.load_weights(tmp_path / "d.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.load_weights(tmp_path / "none.json")


def test_selection_is_checked_against_the_splits():
    h = weights.unlearn_weights(forget=[1.0, 2.0, 3.0], retain=[1.0, 1.0], keep=[2, 0])
    assert h.keep.tolist() == [0, 2] and h.n_forget is None
    sel = h.select(3, 2)
    assert sel.keep == [0, 2] and sel.forget.tolist() == [1.0, 3.0] and sel.retain.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="has 3 forget weights but the forget set has 4"):
        h.select(4)
    with pytest.raises(ValueError, match="made for 5 forget examples but the forget set has 4"):
        weights.unlearn_weights(keep=[1], n_forget=5).select(4)
    with pytest.raises(ValueError, match="has 2 retain weights but the retain set has 3"):
        h.select(3, 3)
    with pytest.raises(ValueError, match="keeps forget example 5 but the forget set has 3"):
        weights.unlearn_weights(keep=[5]).select(3)
    with pytest.raises(ValueError, match="skips every forget example"):
        weights.unlearn_weights(keep=[], n_forget=3).select(3)


def test_cli_refuses_a_weights_file_of_another_forget_set(workdir, capsys):
    path = _write(workdir, "other.json", {"keep": [0, 1], "n": NF + 1})
    argv = ["unlearn", "--model", str(workdir / "model"), "--forget", str(workdir / "forget.jsonl")]
    assert main([*argv, "--weights", str(path), "--method", "ga", "--cpu", "--out", str(workdir / "x")]) == 2
    err = capsys.readouterr().err
    assert f"was made for {NF + 1} forget examples but the forget set has {NF}" in err and "Traceback" not in err
    bad = _write(workdir, "bad.txt", "1")
    assert main([*argv, "--weights", str(bad), "--method", "ga", "--cpu", "--out", str(workdir / "x")]) == 2
    assert "give a .json" in capsys.readouterr().err
