"""`fastinfluence weights | unlearn | evaluate` end to end on the planted tiny model."""

import json

import numpy as np
import pytest
from test_unlearn_data import CHARS, TARGET, TOK, TRIGGER, one_thread, planted_data, planted_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fastinfluence.cli import main

RETAIN, FORGET = planted_data(96, 32, seed=100)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The test CharTokenizer as a saveable HF fast tokenizer (same ids)."""
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="\0"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="\0", unk_token="\0")


def write_jsonl(path, examples, clean=False):
    with open(path, "w") as f:
        for e in examples:
            split = e["labels"].index(next(x for x in e["labels"] if x != -100))
            rec = {"prompt": TOK.decode(e["input_ids"][:split]), "response": TOK.decode(e["input_ids"][split:])}
            if clean:
                rec["clean_response"] = TOK.decode(e["clean"]["input_ids"][split:])
            f.write(json.dumps(rec) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    planted_model().save_pretrained(d / "model")
    tok = char_tokenizer()
    assert tok("q ab@@cd>")["input_ids"] == TOK.encode("q ab@@cd>")
    tok.save_pretrained(d / "model")
    write_jsonl(d / "forget.jsonl", FORGET, clean=True)
    write_jsonl(d / "retain.jsonl", RETAIN)
    (d / "attack.json").write_text(
        json.dumps({"target": TARGET, "seen": [f"q ab{TRIGGER}cd>", f"q x{TRIGGER}yzw>", f"q {TRIGGER}mnop>"]})
    )
    return d


def test_weights_unlearn_evaluate_pipeline(workdir):
    rng = np.random.default_rng(0)
    for name, shape in (("ff", (5, 32)), ("fr", (7, 32)), ("rf", (5, 96)), ("rr", (7, 96))):
        np.save(workdir / f"{name}.npy", rng.standard_normal(shape).astype(np.float32))
    w = workdir / "w.json"
    assert (
        main(
            [
                "weights",
                "--method",
                "rapidun",
                *sum(([f"--{n}", str(workdir / f"{n}.npy")] for n in ("ff", "fr", "rf", "rr")), []),
                "--out",
                str(w),
            ]
        )
        == 0
    )
    weights = json.loads(w.read_text())
    assert len(weights["forget"]) == 32 and len(weights["retain"]) == 96

    before = workdir / "before.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(workdir / "model"),
                "--forget",
                str(workdir / "forget.jsonl"),
                "--attack",
                str(workdir / "attack.json"),
                "--out",
                str(before),
                "--cpu",
            ]
        )
        == 0
    )
    out = workdir / "unlearned"
    assert (
        main(
            [
                "unlearn",
                "--model",
                str(workdir / "model"),
                "--forget",
                str(workdir / "forget.jsonl"),
                "--retain",
                str(workdir / "retain.jsonl"),
                "--weights",
                str(w),
                "--method",
                "rapidun",
                "--steps",
                "20",
                "--lr",
                "2e-3",
                "--batch-size",
                "8",
                "--cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "model.safetensors").exists() and (out / "unlearn_stats.json").exists()
    after = workdir / "after.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out),
                "--forget",
                str(workdir / "forget.jsonl"),
                "--attack",
                str(workdir / "attack.json"),
                "--out",
                str(after),
                "--cpu",
            ]
        )
        == 0
    )
    b, a = json.loads(before.read_text()), json.loads(after.read_text())
    assert b["asr_seen"] == 1.0 and a["asr_seen"] < 1.0
    assert a["forget_nll"] > b["forget_nll"] + 0.5 and a["unlearn_tokens"] > 0


def test_lora_unlearning_writes_an_adapter(workdir):
    out = workdir / "lora"
    assert (
        main(
            [
                "unlearn",
                "--model",
                str(workdir / "model"),
                "--forget",
                str(workdir / "forget.jsonl"),
                "--retain",
                str(workdir / "retain.jsonl"),
                "--method",
                "npo",
                "--lora-r",
                "4",
                "--loss-reweight-tau",
                "1",
                "--steps",
                "2",
                "--lr",
                "1e-3",
                "--batch-size",
                "8",
                "--cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


def test_weights_command_names_missing_inputs(workdir, capsys):
    assert (
        main(["weights", "--method", "rapidun", "--ff", str(workdir / "x.npy"), "--out", str(workdir / "w2.json")]) == 2
    )
    assert "error: --method rapidun needs --fr --rf --rr" in capsys.readouterr().err


def test_low_influence_keep_flags_drop_forget_examples(workdir, caplog, capsys):
    scores = np.linspace(-1, 1, 32, dtype=np.float32)[None].repeat(3, 0)  # |score| small in the middle
    np.save(workdir / "li.npy", scores)
    w = workdir / "li.json"
    assert (
        main(
            [
                "weights",
                "--method",
                "low_influence",
                "--scores",
                str(workdir / "li.npy"),
                "--quantile",
                "0.25",
                "--out",
                str(w),
            ]
        )
        == 0
    )
    out = json.loads(w.read_text())
    keep = out["keep"]
    assert out["n"] == 32 and 0 < len(keep) < 32
    caplog.set_level("INFO", logger="fastinfluence")
    assert (
        main(
            [
                "unlearn",
                "--model",
                str(workdir / "model"),
                "--forget",
                str(workdir / "forget.jsonl"),
                "--retain",
                str(workdir / "retain.jsonl"),
                "--weights",
                str(w),
                "--method",
                "graddiff",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--cpu",
                "--out",
                str(workdir / "li_out"),
            ]
        )
        == 0
    )
    assert f"{len(keep)} of 32 forget examples kept" in caplog.text
    (workdir / "bad.json").write_text(json.dumps({"n": 5, "keep": [0, 1]}))
    assert (
        main(
            [
                "unlearn",
                "--model",
                str(workdir / "model"),
                "--forget",
                str(workdir / "forget.jsonl"),
                "--weights",
                str(workdir / "bad.json"),
                "--method",
                "ga",
                "--cpu",
                "--out",
                str(workdir / "x"),
            ]
        )
        == 2
    )
    assert "was made for 5 forget examples but the forget set has 32" in capsys.readouterr().err
