"""Every user mistake gets one line naming the problem and the fix: on the command line an
exit code of 2 and no traceback; through the API an exception of the documented kind.

Each case is (name, input, expected message fragment). The CLI cases run in-process
(``fastinfluence.cli.main``) on a tiny Llama and GPT-2 built from configs."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import shutil

import numpy as np
import pytest
import torch

import fastinfluence as fi
from fastinfluence import outputs
from fastinfluence.cli import main
from fastinfluence.precondition import Preconditioner

WORDS = "the a cat dog sat ran on under mat log red blue big small fox hen".split()


# ----------------------------------------------------------------------------- fixtures


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=len(WORDS) + 3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
    )
    return BertForMaskedLM(cfg)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A work directory: models, data files, stores and side files every case refers to by name."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("bad")
    tok = _tokenizer()
    _llama().save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    gpt2 = GPT2Config(vocab_size=len(WORDS) + 3, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(gpt2).save_pretrained(d / "gpt2")
    tok.save_pretrained(d / "gpt2")
    _llama().save_pretrained(d / "notok")
    (d / "empty_dir").mkdir()
    (d / "file.txt").write_text("x")
    rows = [{"id": f"t{i}", "prompt": "the cat sat", "response": WORDS[i]} for i in range(4)]
    _jsonl(d / "train.jsonl", rows)
    _jsonl(d / "query.jsonl", rows[:1])
    _jsonl(d / "long.jsonl", [{"prompt": " ".join(WORDS), "response": "red dog"}])
    (d / "badjson.jsonl").write_text('{"prompt": "a", "response": \n')
    (d / "blank.jsonl").write_text("\n\n")
    _jsonl(d / "dup.jsonl", [{"id": 1, "prompt": "a", "response": "b"}, {"id": 1, "prompt": "a", "response": "b"}])
    _jsonl(d / "nonstr.jsonl", [{"prompt": "a", "response": 5}])
    _jsonl(d / "emptyresp.jsonl", [{"id": "e", "prompt": "the cat", "response": ""}])
    _jsonl(d / "norefs.jsonl", [{"prompt": "the", "response": "cat"}])
    common = ["--quiet", "--model", str(d / "model"), "--rank-in", "4", "--rank-out", "4", "--batch-size", "2"]
    assert main(["extract", *common, "--data", str(d / "train.jsonl"), "--out", str(d / "store")]) == 0
    assert main(["extract", *common, "--data", str(d / "query.jsonl"), "--out", str(d / "qstore")]) == 0
    shutil.copytree(d / "store", d / "partial")
    m = json.loads((d / "partial" / "manifest.json").read_text())
    m.update(complete=False, expected_rows=10)
    (d / "partial" / "manifest.json").write_text(json.dumps(m))
    shutil.copytree(d / "store", d / "badmanifest")
    (d / "badmanifest" / "manifest.json").write_text("{not json")
    shutil.copy(d / "train.jsonl", d / "moved.jsonl")
    assert main(["extract", *common, "--data", str(d / "moved.jsonl"), "--out", str(d / "movedstore")]) == 0
    (d / "moved.jsonl").unlink()
    shutil.copy(d / "train.jsonl", d / "edited.jsonl")
    assert main(["extract", *common, "--data", str(d / "edited.jsonl"), "--out", str(d / "editedstore")]) == 0
    _jsonl(d / "edited.jsonl", [dict(r, prompt="a dog ran") for r in rows])
    _jsonl(d / "other_ids.jsonl", [dict(r, id=f"x{i}") for i, r in enumerate(rows)])
    shutil.copytree(d / "store", d / "locked")
    live = {"run": "other", "pid": os.getppid(), "host": os.uname().nodename, "since": 0}
    (d / "locked" / ".lock").write_text(json.dumps(live))
    (d / "cfg_bad.json").write_text("{rank_in: 4")
    (d / "cfg_unknown.json").write_text(json.dumps({"rank": 4}))
    (d / "cfg_list.json").write_text("[4]")
    (d / "cfg_zero.json").write_text(json.dumps({"rank_in": 0}))
    (d / "existing.json").write_text("{}")
    (d / "notnpy.npy").write_text(json.dumps([[1.0]]))
    (d / "scores.json").write_text(json.dumps([[1.0]]))
    np.save(d / "s.npy", np.ones((2, 4), dtype=np.float32))
    (d / "weights_bad.json").write_text("[1, 2")
    (d / "weights_other.json").write_text(json.dumps({"foo": 1}))
    (d / "attack_notarget.json").write_text(json.dumps({"seen": ["the cat"]}))
    (d / "attack_str.json").write_text(json.dumps({"target": "dog", "seen": "the cat"}))
    (d / "attack_nogroup.json").write_text(json.dumps({"target": "dog"}))
    (d / "adapter").mkdir()
    adapter = {"base_model_name_or_path": "no/such/base", "peft_type": "LORA"}
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(adapter))
    shutil.copytree(d / "model", d / "unlearned_other")
    shutil.copytree(d / "model", d / "truncated")
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _bert().save_pretrained(d / "bert")
    tok.save_pretrained(d / "bert")
    (d / "notnorm.safetensors").write_text("a text file")
    (d / "latin1.jsonl").write_bytes(
        b'{"prompt": "the", "response": "cat"}\n{"prompt": "caf\xe9", "response": "dog"}\n'
    )
    (d / "train.jsonl.gz").write_bytes(gzip.compress((d / "train.jsonl").read_bytes()))
    return d


def _argv(w, args: str | list[str]) -> list[str]:
    return [a.format(w=w) for a in (shlex.split(args) if isinstance(args, str) else args)]


SCORE = "score --train {w}/store --query {w}/qstore"
EXTRACT = "extract --model {w}/model --data {w}/train.jsonl"
UNLEARN = "unlearn --model {w}/model --forget {w}/train.jsonl --method ga"
EVALUATE = "evaluate --model {w}/model"

# (name, command line with {w} for the work directory, fragment of the one-line message)
CLI_CASES = [
    # data loss
    ("score --out into a store's manifest", SCORE + " --out {w}/store/manifest.json", "lies inside the feature store"),
    (
        "score --matrix onto a shard",
        SCORE + " --out {w}/o1.json --matrix {w}/store/shards/shard-000000000000.safetensors",
        "lies inside the feature store",
    ),
    ("score --out exists", SCORE + " --out {w}/existing.json", "exists; pass --overwrite"),
    ("score --out is a directory", SCORE + " --out {w}/empty_dir", "is a directory; give a file path"),
    ("score --out under a file", SCORE + " --out {w}/file.txt/top.json", "is a file, not a directory"),
    ("unlearn --out is --model", UNLEARN + " --out {w}/model", "is the input"),
    (
        "unlearn --out another model",
        UNLEARN + " --out {w}/unlearned_other",
        "non-empty directory this command did not write",
    ),
    ("unlearn --out a store", UNLEARN + " --out {w}/store", "inside the feature store"),
    ("extract --out a model directory", EXTRACT + " --out {w}/gpt2", "is a model directory; give a new"),
    ("extract --out a file", EXTRACT + " --out {w}/file.txt", "is a file; give a directory"),
    (
        "weights --out exists",
        "weights --method low_influence --scores {w}/s.npy --quantile 0.5 --out {w}/existing.json",
        "exists; pass --overwrite",
    ),
    (
        "evaluate --out in a store",
        EVALUATE + " --clean {w}/train.jsonl --out {w}/store/eval.json",
        "lies inside the feature store",
    ),
    # silent wrong results
    (
        "score an incomplete store",
        "score --train {w}/partial --query {w}/qstore --out {w}/o2.json",
        "is incomplete (4 of 10 examples)",
    ),
    (
        "score --damping negative",
        SCORE + " --out {w}/o3.json --precondition diagonal --damping -1",
        "error: --damping must be a positive finite number",
    ),
    ("score --damping 0", SCORE + " --out {w}/o3.json --damping 0", "--damping must be a positive finite number"),
    ("extract --max-length -5", EXTRACT + " --out {w}/s1 --max-length -5", "--max-length must be >= 2"),
    (
        "score texts edited since extraction",
        "score --train {w}/editedstore --query {w}/qstore --out {w}/o4.json",
        "changed since the store was extracted",
    ),
    (
        "score texts moved since extraction",
        "score --train {w}/movedstore --query {w}/qstore --out {w}/o5.json",
        "which is gone: give --train-data FILE",
    ),
    (
        "score --train-data with other ids",
        SCORE + " --out {w}/o6.json --train-data {w}/other_ids.jsonl",
        "has no example with ids",
    ),
    (
        "extract an empty response",
        "extract --model {w}/model --data {w}/emptyresp.jsonl --out {w}/s2",
        "example 'e': the response has no tokens",
    ),
    (
        "attack group is a string",
        EVALUATE + " --attack {w}/attack_str.json --out {w}/e1.json",
        "attack group 'seen' must be a non-empty list",
    ),
    (
        "attack without target",
        EVALUATE + " --attack {w}/attack_notarget.json --out {w}/e2.json",
        "non-empty string 'target'",
    ),
    ("attack without groups", EVALUATE + " --attack {w}/attack_nogroup.json --out {w}/e3.json", "no group of prompts"),
    ("evaluate without inputs", EVALUATE + " --out {w}/e4.json", "nothing to evaluate"),
    (
        "evaluate --holdout without --forget",
        EVALUATE + " --holdout {w}/train.jsonl --out {w}/e5.json",
        "give --forget too",
    ),
    (
        "evaluate --retrained without --forget",
        EVALUATE + " --clean {w}/train.jsonl --retrained {w}/model --out {w}/e6.json",
        "--retrained is compared on --forget",
    ),
    ("bench --ops foo", "bench --ops foo", "unknown ops foo for --ops"),
    (
        "unlearn rapidun without clean answers",
        "unlearn --model {w}/model --forget {w}/norefs.jsonl --retain {w}/train.jsonl --method rapidun --out {w}/u1",
        "norefs.jsonl have none: add 'clean_response' to every line, or pass --rapidun-without-clean",
    ),
    (
        "unlearn --ratio 0 with a retain term",
        "unlearn --model {w}/model --forget {w}/train.jsonl --retain {w}/train.jsonl --ratio 0 --out {w}/u1",
        "--ratio 0 pairs no retain example with each forget example, but --method graddiff has a retain term: use "
        "--ratio 1 or more",
    ),
    (
        "unlearn graddiff without --retain",
        "unlearn --model {w}/model --forget {w}/train.jsonl --out {w}/u1",
        "has a retain term: give --retain",
    ),
    # model loading
    (
        "--model does not exist",
        "extract --model {w}/no_such_model --data {w}/train.jsonl --out {w}/s3",
        "no such directory",
    ),
    (
        "--model is a file",
        "extract --model {w}/file.txt --data {w}/train.jsonl --out {w}/s3",
        "is a file; give the model directory",
    ),
    (
        "--model has no config",
        "extract --model {w}/empty_dir --data {w}/train.jsonl --out {w}/s3",
        "is not a model directory",
    ),
    ("--model has no tokenizer", "extract --model {w}/notok --data {w}/train.jsonl --out {w}/s3", "no tokenizer in"),
    (
        "adapter base is not local",
        "extract --model {w}/adapter --data {w}/train.jsonl --out {w}/s3",
        "is not a local model directory",
    ),
    (
        "evaluate --retrained does not exist",
        EVALUATE + " --forget {w}/train.jsonl --retrained {w}/nope --out {w}/e7.json",
        "nope: no such directory",
    ),
    (
        "--model with truncated weights",
        "extract --model {w}/truncated --data {w}/train.jsonl --out {w}/s3",
        "model.safetensors cannot be read (Error while deserializing header: incomplete metadata, file not fully "
        "covered): the file is truncated or corrupt; copy or save the model again",
    ),
    (
        "--model is a masked LM",
        "extract --model {w}/bert --data {w}/train.jsonl --out {w}/s3",
        "holds a BertForMaskedLM (config.json 'architectures'), not a causal LM (AutoModelForCausalLM would load it "
        "as BertLMHeadModel",
    ),
    # lengths and tokens
    (
        "GPT-2 input longer than n_positions",
        "extract --model {w}/gpt2 --data {w}/long.jsonl --out {w}/s4 --max-length 20",
        "error: examples [0] are 19 tokens long (with padding) but the model takes at most 8 positions:"
        " truncate them (--max-length <= 8)",
    ),
    # malformed side files and flags
    (
        "manifest is not JSON",
        "score --train {w}/badmanifest --query {w}/qstore --out {w}/o7.json",
        "manifest.json is not valid JSON",
    ),
    ("--config not JSON", EXTRACT + " --out {w}/s5 --config {w}/cfg_bad.json", "is not valid JSON"),
    (
        "--config unknown field",
        EXTRACT + " --out {w}/s5 --config {w}/cfg_unknown.json",
        "unknown field(s) rank; the fields are rank_in",
    ),
    (
        "--config is a list",
        EXTRACT + " --out {w}/s5 --config {w}/cfg_list.json",
        "must hold one object of ProjectionConfig fields",
    ),
    ("--config missing", EXTRACT + " --out {w}/s5 --config {w}/nope.json", "nope.json: no such file"),
    ("--config rank_in 0", EXTRACT + " --out {w}/s5 --config {w}/cfg_zero.json", "--rank-in must be a positive int"),
    ("--rank-in 0", EXTRACT + " --out {w}/s5 --rank-in 0", "--rank-in must be a positive int"),
    (
        "--ff is JSON named .npy",
        "weights --method rapidun --ff {w}/notnpy.npy --fr {w}/s.npy --rf {w}/s.npy --rr {w}/s.npy --out {w}/w1.json",
        "is not a .npy array",
    ),
    (
        "--scores is a .json",
        "weights --method low_influence --scores {w}/scores.json --quantile 0.5 --out {w}/w2.json",
        "give a .npy or .pt tensor file",
    ),
    (
        "--scores missing",
        "weights --method low_influence --scores {w}/nope.npy --quantile 0.5 --out {w}/w3.json",
        "nope.npy: no such file",
    ),
    ("imu without --forget-grads", "weights --method imu --out {w}/w4.json", "needs --forget-grads"),
    (
        "rapidun without all matrices",
        "weights --method rapidun --ff {w}/s.npy --out {w}/w5.json",
        "needs --fr --rf --rr",
    ),
    ("extract --batch-size 0", EXTRACT + " --out {w}/s6 --batch-size 0", "--batch-size must be >= 1"),
    ("extract --shard-rows 0", EXTRACT + " --out {w}/s6 --shard-rows 0", "--shard-rows must be >= 1"),
    ("score --topk 0", SCORE + " --out {w}/o8.json --topk 0", "--topk must be >= 1"),
    ("score --chunk-rows 0", SCORE + " --out {w}/o8.json --chunk-rows 0", "--chunk-rows must be >= 1"),
    ("unlearn --batch-size 0", UNLEARN + " --out {w}/u2 --batch-size 0", "--batch-size must be >= 1"),
    ("unlearn --lr 0", UNLEARN + " --out {w}/u2 --lr 0", "--lr and --epochs must be > 0"),
    (
        "evaluate --batch-size 0",
        EVALUATE + " --clean {w}/train.jsonl --out {w}/e8.json --batch-size 0",
        "--batch-size must be >= 1",
    ),
    ("bench --device cuda without CUDA", "bench --device cuda", "CUDA is not available"),
    ("bench --repeats 0", "bench --repeats 0", "--repeats must be >= 1"),
    (
        "extract --device cuda without CUDA",
        EXTRACT + " --out {w}/s7 --device cuda",
        "CUDA is not available on this machine; use --device cpu",
    ),
    ("extract --device tpu", EXTRACT + " --out {w}/s7 --device tpu", "is not a device"),
    ("invalid include regex", EXTRACT + " --out {w}/s8 --include (mlp", "the include regex '(mlp' is invalid"),
    ("invalid exclude regex", EXTRACT + " --out {w}/s8 --exclude [", "the exclude regex '[' is invalid"),
    (
        "include matches nothing",
        EXTRACT + " --out {w}/s8 --include nothing_here",
        "Adjust the regexes in --include / --exclude",
    ),
    (
        "--train is a file",
        "score --train {w}/train.jsonl --query {w}/qstore --out {w}/o9.json",
        "is a file, not a feature store directory",
    ),
    ("--train does not exist", "score --train {w}/nostore --query {w}/qstore --out {w}/o9.json", "no feature store at"),
    (
        "--train has no manifest",
        "score --train {w}/empty_dir --query {w}/qstore --out {w}/o9.json",
        "manifest.json is missing",
    ),
    (
        "--query JSONL without --model",
        "score --train {w}/store --query {w}/query.jsonl --out {w}/o9.json",
        "give --model",
    ),
    ("kfac without covariances", SCORE + " --out {w}/o9.json --precondition kfac", "extracted with --covariances"),
    ("--data missing", "extract --model {w}/model --data {w}/nope.jsonl --out {w}/s9", "no such file"),
    (
        "--data is a directory",
        "extract --model {w}/model --data {w}/empty_dir --out {w}/s9",
        "is a directory; give a JSONL file",
    ),
    (
        "--data line is not JSON",
        "extract --model {w}/model --data {w}/badjson.jsonl --out {w}/s9",
        "line 1 is not valid JSON",
    ),
    (
        "--data in Latin-1",
        "extract --model {w}/model --data {w}/latin1.jsonl --out {w}/s9",
        "latin1.jsonl line 2 is not UTF-8 (byte 0xe9 at column 16): JSONL must be UTF-8; convert the file",
    ),
    (
        "--data gzipped",
        "extract --model {w}/model --data {w}/train.jsonl.gz --out {w}/s9",
        "train.jsonl.gz is gzip-compressed: decompress it (gunzip)",
    ),
    (
        "--normalizer not safetensors",
        EXTRACT + " --out {w}/s9 --normalizer {w}/notnorm.safetensors",
        "notnorm.safetensors is not a safetensors file (",
    ),
    ("--data has no examples", "extract --model {w}/model --data {w}/blank.jsonl --out {w}/s9", "holds no examples"),
    ("--data duplicate ids", "extract --model {w}/model --data {w}/dup.jsonl --out {w}/s9", "id 1 occurs twice"),
    (
        "--data response not a string",
        "extract --model {w}/model --data {w}/nonstr.jsonl --out {w}/s9",
        "'response' must be a string",
    ),
    (
        "unlearn --weights not JSON",
        UNLEARN + " --out {w}/u3 --weights {w}/weights_bad.json",
        "weights_bad.json is not valid JSON",
    ),
    (
        "unlearn --weights other keys",
        UNLEARN + " --out {w}/u3 --weights {w}/weights_other.json",
        "holds none of 'forget', 'retain', 'keep'",
    ),
    ("evaluate --attack missing", EVALUATE + " --attack {w}/nope.json --out {w}/e9.json", "nope.json: no such file"),
    (
        "resume with another projection",
        EXTRACT + " --out {w}/store --rank-in 2 --rank-out 4",
        "were made with a different layer set",
    ),
    (
        "resume without --covariances flag match",
        EXTRACT + " --out {w}/store --rank-in 4 --rank-out 4 --covariances",
        "was extracted with neither --tokens nor --covariances; pass the same flags to resume or extend it"
        " (got --covariances)",
    ),
    (
        "store written by another run",
        EXTRACT + " --out {w}/locked --rank-in 4 --rank-out 4 --batch-size 2",
        "is being written by another run (pid",
    ),
    # argparse's own errors: also one line, exit code 2
    ("unknown --metric", SCORE + " --out {w}/o.json --metric foo", "invalid choice: 'foo'"),
    ("non-integer --topk", SCORE + " --out {w}/o.json --topk ten", "invalid int value: 'ten'"),
    ("missing --out", SCORE, "the following arguments are required: --out"),
    ("unknown command", "explain", "invalid choice: 'explain'"),
]


@pytest.mark.parametrize("name, args, fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_mistake_is_one_line_with_exit_code_2(w, capsys, name, args, fragment):
    try:
        rc = main(_argv(w, args))
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and fragment in lines[0], err


def test_debug_shows_the_traceback_of_a_mistake(w):
    from fastinfluence.errors import UsageError

    with pytest.raises(UsageError, match="--batch-size must be >= 1"):
        main(_argv(w, EXTRACT + " --out {w}/s --batch-size 0 --debug"))


def test_a_bug_keeps_its_traceback(w, monkeypatch):
    from fastinfluence.cli import extract

    def broken(*a, **k):
        raise KeyError("internal")

    monkeypatch.setattr(extract, "read_jsonl", broken)
    with pytest.raises(KeyError):
        main(_argv(w, ["extract", "--model", "{w}/model", "--data", "{w}/train.jsonl", "--out", "{w}/sbug"]))


def test_no_failed_command_left_an_output_behind(w):
    for name in ("o1.json", "o2.json", "o3.json", "o8.json", "u1", "u2", "s1", "s3", "s4", "s5", "s6"):
        assert not (w / name).exists(), name
    assert json.loads((w / "existing.json").read_text()) == {}
    other = w / "unlearned_other"
    assert (other / "config.json").exists() and not (other / "adapter_config.json").exists()
    assert not list(w.glob(".*tmp-*"))


# ----------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api(w):
    """(model, the train store, the query store)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w / "model")
    return model, fi.FeatureStore.open(w / "store"), fi.FeatureStore.open(w / "qstore")


def _batch(**over):
    b = {
        "input_ids": torch.tensor([[3, 4, 5, 6]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 5, 6]]),
    }
    b.update(over)
    return {k: v for k, v in b.items() if v is not None}


def _extract(model, batch, **config):
    return fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=4, rank_out=4, **config)).extract([batch])


def _score(api, **kw):
    _, train, query = api
    return fi.score(query, train, **kw)


def _lock_second_writer(w):
    from fastinfluence.store.lock import writing

    with writing(w / "lockstore"):  # this run holds it; an independent writer is refused
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_try_write, args=(str(w / "lockstore"), q))
        p.start()
        p.join(60)
        raise ValueError(q.get(timeout=5))


def _try_write(path, q):
    from fastinfluence.store.lock import writing

    try:
        with writing(path):
            q.put("not refused")
    except Exception as exc:  # reported to the parent
        q.put(f"{type(exc).__name__}: {exc}")


API_CASES = [
    (
        "ProjectionConfig rank_in 0",
        ValueError,
        "rank_in must be a positive int",
        lambda w, api: fi.ProjectionConfig(rank_in=0),
    ),
    (
        "invalid include regex",
        ValueError,
        "the include regex '\\(q' is invalid",
        lambda w, api: _extract(api[0], _batch(), include=["(q"]),
    ),
    (
        "float labels",
        ValueError,
        "labels has dtype torch.float32; it must hold integers",
        lambda w, api: _extract(api[0], _batch(labels=torch.tensor([[-100.0, -100.0, 5.0, 6.0]]))),
    ),
    (
        "float input_ids",
        ValueError,
        "input_ids has dtype torch.float32",
        lambda w, api: _extract(api[0], _batch(input_ids=torch.tensor([[3.0, 4, 5, 6]]))),
    ),
    (
        "token id past the vocabulary",
        ValueError,
        "outside 0..18 \\(the model's vocabulary",
        lambda w, api: _extract(api[0], _batch(input_ids=torch.tensor([[3, 4, 500, 6]]))),
    ),
    (
        "negative label other than -100",
        ValueError,
        "labels outside 0..18 and not -100",
        lambda w, api: _extract(api[0], _batch(labels=torch.tensor([[-100, -100, -5, 6]]))),
    ),
    (
        "no label tokens",
        ValueError,
        "have no label tokens",
        lambda w, api: _extract(api[0], _batch(labels=torch.full((1, 4), -100))),
    ),
    (
        "labels of another shape",
        ValueError,
        "labels has shape \\(1, 2\\) but input_ids has \\(1, 4\\)",
        lambda w, api: _extract(api[0], _batch(labels=torch.tensor([[1, 2]]))),
    ),
    (
        "no mask and a pad inside",
        ValueError,
        "pass attention_mask",
        lambda w, api: _extract(api[0], _batch(input_ids=torch.tensor([[3, 0, 5, 6]]), attention_mask=None)),
    ),
    (
        "negative damping",
        ValueError,
        "damping must be a positive finite number",
        lambda w, api: _score(api, precondition="diagonal", damping=-1.0),
    ),
    (
        "matrix and matrix_path",
        ValueError,
        "not both",
        lambda w, api: _score(api, matrix=True, matrix_path=w / "m.npy"),
    ),
    ("topk 0", ValueError, "topk must be >= 1", lambda w, api: _score(api, topk=0)),
    ("unknown metric", ValueError, "metric must be one of", lambda w, api: _score(api, metric="l2")),
    (
        "unknown precondition",
        ValueError,
        "precondition must be None, a Preconditioner or one of",
        lambda w, api: _score(api, precondition="hessian"),
    ),
    (
        "incomplete train store",
        Exception,
        "is incomplete \\(4 of 10 examples\\).*re-run the same extraction",
        lambda w, api: fi.score(api[2], fi.FeatureStore.open(w / "partial")),
    ),
    (
        "token_scores row -1",
        IndexError,
        "rows \\[-1\\] are outside the train rows 0..3",
        lambda w, api: fi.token_scores(api[2], api[1], rows=[-1]),
    ),
    ("token_scores no rows", ValueError, "rows is empty", lambda w, api: fi.token_scores(api[2], api[1], rows=[])),
    (
        "store path is a file",
        Exception,
        "is a file, not a feature store directory",
        lambda w, api: fi.FeatureStore.open(w / "file.txt"),
    ),
    (
        "manifest not JSON",
        Exception,
        "manifest.json is not valid JSON",
        lambda w, api: fi.FeatureStore.open(w / "badmanifest"),
    ),
    (
        "Preconditioner damping 0",
        ValueError,
        "damping must be a positive finite number",
        lambda w, api: Preconditioner("diagonal", {}, {}, damping=0.0),
    ),
    (
        "attack group a string",
        ValueError,
        "attack group 'seen' must be a non-empty list",
        lambda w, api: fi.evaluate.check_attack({"target": "x", "seen": "the cat"}),
    ),
    ("evaluate with no inputs", ValueError, "nothing to measure", lambda w, api: fi.evaluate.evaluate(api[0])),
    (
        "empty response",
        ValueError,
        "example 'z': the response has no tokens",
        lambda w, api: fi.data.encode(_tokenizer(), [{"id": "z", "prompt": "a", "response": ""}]),
    ),
    (
        "max_length 1",
        ValueError,
        "max_length must be >= 2",
        lambda w, api: fi.data.batches(_tokenizer(), [{"prompt": "a", "response": "b"}], max_length=1),
    ),
    (
        "batch_size 0",
        ValueError,
        "batch_size must be a positive int or None, got 0",
        lambda w, api: fi.data.batches(_tokenizer(), [{"prompt": "a", "response": "b"}], batch_size=0),
    ),
    (
        "one dict as examples",
        TypeError,
        "not one dict",
        lambda w, api: fi.data.encode(_tokenizer(), {"prompt": "a", "response": "b"}),
    ),
    (
        "UnlearnDataset negative epoch",
        ValueError,
        "epoch must be >= 0",
        lambda w, api: fi.unlearn.UnlearnDataset([{"input_ids": [1, 2], "labels": [1, 2]}], ratio=0).set_epoch(-1),
    ),
    (
        "no free space for an output",
        ValueError,
        "needs .* MiB but .* MiB free; free space or choose another disk",
        lambda w, api: outputs.check_file(w / "big.npy", "--matrix", False, need_bytes=1 << 60),
    ),
    (
        "second independent store writer",
        ValueError,
        "StoreLockedError: store .*lockstore is being written by another run \\(pid",
        lambda w, api: _lock_second_writer(w),
    ),
]


@pytest.mark.parametrize("name, kind, match, call", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_mistake_raises_a_named_error(w, api, name, kind, match, call):
    with pytest.raises(kind, match=match):
        call(w, api)


# ----------------------------------------------------------------------------- what used to be silently wrong


def test_a_frozen_peft_adapter_captures_only_its_lora_layers(w, caplog):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=2, target_modules=["q_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(w / "model"), lora).save_pretrained(w / "lora")
    frozen = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(w / "model"), w / "lora"
    )  # is_trainable=False
    assert not any(p.requires_grad for p in frozen.parameters())
    caplog.set_level("INFO", logger="fastinfluence.capture")
    names = [layer.name for layer in fi.GradientExtractor(frozen).layers]
    assert names and all(".lora_" in n for n in names)
    assert "LoRA layers of the PEFT model" in caplog.text


def test_a_model_with_no_trainable_layer_warns_that_it_captures_every_layer(api, caplog):
    model = api[0]
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        caplog.set_level("WARNING", logger="fastinfluence.capture")
        assert len(fi.GradientExtractor(model).layers) > 1 and "capturing every supported layer" in caplog.text
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def test_a_left_padded_batch_without_mask_gives_the_features_of_its_mask(api, caplog):
    model = api[0]
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 8, 9, 3, 4, 5]])
    labels = torch.tensor([[-100, -100, -100, -100, 5, 6], [-100, -100, -100, -100, 4, 5]])
    with_mask = _extract(model, {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels})
    inferred = _extract(model, {"input_ids": ids, "labels": labels})
    torch.testing.assert_close(inferred.data, with_mask.data, rtol=1e-5, atol=1e-7)
    assert "taking the leading/trailing pad tokens (id 0) as padding" in caplog.text


def test_score_refuses_a_query_model_unlike_the_train_stores_before_extracting(w, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(w / "model")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2.0)
    other.save_pretrained(w / "other_weights")
    _tokenizer().save_pretrained(w / "other_weights")

    def extract(*args, **kwargs):
        raise AssertionError("queries extracted before the mismatch was found")

    monkeypatch.setattr(fi.GradientExtractor, "extract", extract)
    args = "score --train {w}/store --query {w}/query.jsonl --model {w}/other_weights --out {w}/o10.json"
    assert main(_argv(w, args)) == 2
    assert "were made with a different model" in capsys.readouterr().err


def test_batches_without_labels_are_named_once_per_extraction(api, caplog):
    caplog.set_level("WARNING", logger="fastinfluence")
    unlabelled = [_batch(labels=None)] * 3
    extractor = fi.GradientExtractor(api[0], fi.ProjectionConfig(rank_in=2, rank_out=2))
    for _ in range(2):
        extractor.extract(unlabelled)
    said = [r.getMessage() for r in caplog.records if "has no 'labels'" in r.getMessage()]
    assert len(said) == 2 and "every attended token is a target, the prompt's too" in said[0]


def test_allow_incomplete_scores_the_rows_that_are_there(w, capsys):
    args = "--quiet score --train {w}/partial --query {w}/qstore --out {w}/partial.json --allow-incomplete"
    assert main(_argv(w, args)) == 0
    assert len(json.loads((w / "partial.json").read_text())["queries"][0]["top"]) == 4


def test_overwrite_replaces_an_output_whole_and_matrix_true_equals_the_written_matrix(w, api):
    out, m = w / "again.json", w / "again.npy"
    for flags in ([], ["--overwrite"]):
        assert main(_argv(w, ["--quiet", *shlex.split(SCORE), "--out", str(out), "--matrix", str(m), *flags])) == 0
    np.testing.assert_array_equal(np.load(m), _score(api, matrix=True).matrix)


def test_an_unlearned_adapter_records_its_base_model_by_absolute_path(w, monkeypatch):
    monkeypatch.chdir(w)
    assert (
        main(
            [
                "--quiet",
                "unlearn",
                "--model",
                "model",
                "--forget",
                "train.jsonl",
                "--method",
                "ga",
                "--lora-r",
                "2",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--cpu",
                "--out",
                "unlearned",
            ]
        )
        == 0
    )
    base = json.loads((w / "unlearned" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((w / "model").resolve())
    monkeypatch.chdir(w / "empty_dir")  # the adapter loads from anywhere
    clean = str(w / "train.jsonl")
    assert main(["--quiet", "evaluate", "--model", str(w / "unlearned"), "--clean", clean, "--out", "e.json"]) == 0


def test_rapidun_without_clean_answers_runs_when_asked_by_name(w):
    args = (
        "--quiet unlearn --model {w}/model --forget {w}/norefs.jsonl --retain {w}/train.jsonl --method rapidun "
        "--rapidun-without-clean --steps 1 --batch-size 1 --cpu --out {w}/rapidun_out"
    )
    assert main(_argv(w, args)) == 0


def test_a_masked_lm_is_refused_by_the_python_api_before_any_forward():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    from fastinfluence.kfac import fit_kfac

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, len(WORDS) + 3, (2, 5), generator=g)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    bert = _bert()
    calls = []
    bert.register_forward_pre_hook(lambda *a: calls.append(1))
    what = (
        "model is a BertForMaskedLM, not a causal LM \\(for its architecture: AutoModelForCausalLM, BertLMHeadModel\\)"
    )
    for call in (
        lambda m: fi.GradientExtractor(m).extract(batches),
        lambda m: fi.exact_scores(m, batches, batches),
        lambda m: fit_kfac(m, batches),
    ):
        with pytest.raises(ValueError, match=what + ": fastinfluence needs a decoder-only language model"):
            call(bert)
    lora = get_peft_model(_bert(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="is a BertForMaskedLM, not a causal LM"):  # judged by its base model
        fi.GradientExtractor(lora)
    bare = BertModel(BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="is a BertModel, not a causal LM"):
        fi.exact_scores(bare, batches, batches)
    assert not calls
    fi.GradientExtractor(_llama())  # a causal LM passes
