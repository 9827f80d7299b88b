"""Length-bucketed batching: batches padded to their own longest, features and stores back in data order."""

from __future__ import annotations

import re

import pytest
import torch

from fastinfluence import GradientExtractor, ProjectionConfig
from fastinfluence.batching import length_batches, windows
from fastinfluence.store import FeatureStore, write_store
from tests.helpers import collate, make_examples, tiny_model
from tests.test_cli import data as cli_data  # noqa: F401 (fixtures, taken through request.getfixturevalue)
from tests.test_cli import model_dir as cli_model_dir  # noqa: F401
from tests.test_data import tok as data_tok  # noqa: F401

N = 22
IDS = [f"ex{i}" for i in range(N)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def examples():
    return make_examples(N, seed=3, min_len=3, max_len=24)


def plain(examples, size=4):
    starts = range(0, len(examples), size)
    return [collate(examples[s : s + size], ids=IDS[s : min(s + size, len(examples))]) for s in starts]


def bucketed(examples, **kw):
    plan = length_batches([len(i) for i, _ in examples], **kw)
    return [dict(collate([examples[i] for i in idx], ids=[IDS[i] for i in idx]), positions=idx) for idx in plan]


def extractor(model):
    return GradientExtractor(model, ProjectionConfig(rank_in=6, rank_out=5, seed=1))


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    "kw", [dict(batch_size=4), dict(batch_size=None, max_tokens=40), dict(batch_size=3, max_tokens=50, window=7)]
)
def test_length_batches_cover_every_example_once_within_both_limits(examples, kw):
    lengths = [len(i) for i, _ in examples]
    plan = length_batches(lengths, **kw)
    assert sorted(i for b in plan for i in b) == list(range(N))
    for b in plan:
        if kw.get("batch_size"):
            assert len(b) <= kw["batch_size"]
        if kw.get("max_tokens"):
            assert len(b) * max(lengths[i] for i in b) <= kw["max_tokens"]
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    window = kw.get("window")
    if window:  # each window's examples stay in their window, so windows() recovers them
        batches = [{"input_ids": [0] * len(b), "positions": b} for b in plan]
        covered = [sorted(p for i in w for p in plan[i]) for w in windows(batches)]
        assert covered == [list(range(s, min(s + window, N))) for s in range(0, N, window)]


def test_bucketing_pads_less_than_data_order(examples):
    lengths = [len(i) for i, _ in examples]

    def padded(plan):
        return sum(len(b) * max(lengths[i] for i in b) for b in plan)

    in_order = [list(range(s, min(s + 4, N))) for s in range(0, N, 4)]
    assert padded(length_batches(lengths, batch_size=4, window=None)) < padded(in_order)


def test_a_seed_shuffles_the_windows_reproducibly():
    lengths = list(range(1, 41))
    a, b = length_batches(lengths, 4, window=8, seed=5), length_batches(lengths, 4, window=8, seed=5)
    assert a == b != length_batches(lengths, 4, window=8)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=None), "needs batch_size or max_tokens"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(batch_size=4, window=0), "window must be a positive int"),
        (dict(batch_size=None, max_tokens=5), "example 1 has 9 tokens, more than max_tokens=5"),
        (dict(batch_size=4, max_tokens=True), "max_tokens must be a positive int"),
    ],
)
def test_bad_limits_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        length_batches([3, 9, 4], **kw)


@pytest.mark.parametrize(
    "positions, match",
    [
        ([[0, 1], [1, 2]], "occurs twice"),
        ([[0, 2], [3, 4]], "skip data positions"),
        ([[1, 0], [0, 2]], "occurs twice"),
        ([[0, -1]], "non-negative ints"),
        ([[0, 1, 2]], "3 entries for 2 examples"),
    ],
)
def test_bad_positions_are_refused(model, examples, positions, match):
    batches = [dict(collate(examples[2 * k : 2 * k + 2]), positions=p) for k, p in enumerate(positions)]
    with pytest.raises(ValueError, match=match):
        extractor(model).extract(batches)


def records(n=13):
    import random

    rng = random.Random(1)
    words = "the a cat dog sat ran on under mat log red blue".split()
    return [
        {"id": f"r{i}", "prompt": " ".join(rng.choices(words, k=rng.randint(1, 9))), "response": rng.choice(words)}
        for i in range(n)
    ]


def test_data_batches_bucketed_hold_the_same_examples_with_positions(request):
    from fastinfluence import data

    tok = request.getfixturevalue("data_tok")
    plain_rows = {}
    for b in data.batches(tok, records(), batch_size=4):
        for k, i in enumerate(b["ids"]):
            plain_rows[i] = b["input_ids"][k][b["attention_mask"][k].bool()].tolist()
    out = data.batches(tok, records(), batch_size=None, max_tokens=24, window=6)
    loader = list(data.dataloader(tok, records(), batch_size=None, max_tokens=24, window=6))
    assert len(out) == len(loader)
    for b, l in zip(out, loader):
        assert b["ids"] == l["ids"] and b["positions"] == l["positions"]
        assert torch.equal(b["input_ids"], l["input_ids"]) and torch.equal(b["labels"], l["labels"])
        assert b["input_ids"].numel() <= 24 and b["attention_mask"][:, -1].any()  # padded to its own longest
        for k, i in enumerate(b["ids"]):
            assert i == f"r{b['positions'][k]}"
            assert b["input_ids"][k][b["attention_mask"][k].bool()].tolist() == plain_rows[i]
    assert sorted(p for b in out for p in b["positions"]) == list(range(13))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_tokens="64"), "max_tokens must be a positive int or None, got '64'"),
        (dict(max_tokens=0), "max_tokens must be a positive int or None, got 0"),
        (dict(bucket="yes"), "bucket must be True or False"),
        (dict(max_tokens=3), r"example 'r\d+' has \d+ tokens, more than max_tokens=3"),
        (dict(bucket=True, shuffle=True), "shuffle=True does not apply"),
    ],
)
def test_bad_bucketing_arguments_of_the_data_helpers(request, kw, match):
    from fastinfluence import data

    tok = request.getfixturevalue("data_tok")
    with pytest.raises(ValueError, match=match):
        data.dataloader(tok, records(), **kw)
    if "shuffle" not in kw:
        with pytest.raises(ValueError, match=match):
            data.batches(tok, records(), **kw)


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("kw", [dict(batch_size=4, window=None), dict(batch_size=None, max_tokens=60, window=9)])
def test_bucketed_features_equal_data_order_features(model, examples, kw):
    ext = extractor(model)
    ref = ext.extract(plain(examples), tokens=True, covariances=True)
    out = ext.extract(bucketed(examples, **kw), tokens=True, covariances=True)
    assert out.ids == ref.ids == IDS
    assert torch.allclose(out.data, ref.data, rtol=0, atol=1e-10 * ref.data.abs().max())
    assert torch.allclose(out.norms, ref.norms)
    assert torch.equal(out.tokens.offsets, ref.tokens.offsets)
    for n in ref.tokens.a:
        assert torch.allclose(out.tokens.a[n], ref.tokens.a[n], atol=1e-10)
        assert torch.allclose(out.tokens.g[n], ref.tokens.g[n], atol=1e-10)
        for x, y in zip(out.stats[n][:2], ref.stats[n][:2]):
            assert torch.allclose(x, y, atol=1e-10 * y.abs().max())
        assert out.stats[n][2] == ref.stats[n][2]


def test_bucketed_batches_without_ids_are_named_by_their_data_position(model, examples):
    batches = bucketed(examples, batch_size=5, window=None)
    for b in batches:
        del b["ids"]
        b["positions"] = torch.tensor(b["positions"])  # tensors (and numpy arrays) of positions are fine
    assert extractor(model).extract(batches).ids == list(range(N))


def test_skipping_examples_counts_in_data_order(model, examples):
    ext = extractor(model)
    ref = ext.extract(plain(examples))
    parts = list(ext.iter_features(bucketed(examples, batch_size=3, window=8), skip_examples=5))
    assert [len(p) for p in parts] == [3, 8, 6]  # windows 0..7 (less the 5 skipped), 8..15, 16..21
    assert [i for p in parts for i in p.ids] == IDS[5:]
    assert torch.allclose(torch.cat([p.data for p in parts]), ref.data[5:], atol=1e-10 * ref.data.abs().max())


def test_exact_scores_of_bucketed_batches_are_in_data_order(model, examples):
    from fastinfluence import exact_scores

    query = examples[:7]
    ref = exact_scores(model, plain(query, 3), plain(examples))
    out = exact_scores(model, bucketed(query, batch_size=2), bucketed(examples, batch_size=None, max_tokens=70))
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * ref.abs().max())


def test_scores_of_bucketed_train_batches_name_the_same_examples(model, examples):
    from fastinfluence import score, score_batches

    ext = extractor(model)
    query = ext.extract(plain(examples[:3]))
    ref = score(query, ext.extract(plain(examples)), topk=5)
    for out in (
        score(query, ext.extract(bucketed(examples, batch_size=4, window=8)), topk=5),
        score_batches(ext, query, bucketed(examples, batch_size=4, window=8), topk=5),
    ):
        assert out.train_ids == IDS and out.topk_ids == ref.topk_ids
        assert torch.equal(out.topk_indices, ref.topk_indices)
        assert torch.allclose(out.topk_values, ref.topk_values, rtol=1e-6)


# ----------------------------------------------------------------------------- stores


def test_store_of_bucketed_batches_equals_store_of_plain_batches(model, examples, tmp_path):
    ext = extractor(model)
    ref = write_store(tmp_path / "plain", ext, plain(examples), tokens=True, shard_rows=5)
    out = write_store(tmp_path / "bucketed", ext, bucketed(examples, batch_size=3, window=6), tokens=True, shard_rows=5)
    assert out.ids == ref.ids == IDS
    a, b = out.to_features(), ref.to_features()
    assert torch.allclose(a.data, b.data, atol=1e-6 * b.data.abs().max())  # float32 storage
    for row in range(N):
        (a_out, g_out), (a_ref, g_ref) = out.token_factors(row), ref.token_factors(row)
        for n in a_ref:
            assert torch.allclose(a_out[n], a_ref[n], atol=1e-6) and torch.allclose(g_out[n], g_ref[n], atol=1e-6)


def test_bucketed_batches_resume_and_append_a_store(model, examples, tmp_path, monkeypatch):
    """An interrupted bucketed run resumes at its last whole window; new examples append in data order."""
    ext = extractor(model)
    ref = ext.extract(plain(examples))
    head = bucketed(examples[:12], batch_size=3, window=6)
    import fastinfluence.store.writer as writer

    real, calls = writer._write_shard, []

    def dies_after_first_shard(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(writer, "_write_shard", dies_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", ext, head, shard_rows=1)
    monkeypatch.setattr(writer, "_write_shard", real)
    assert calls == [0]
    write_store(tmp_path / "s", ext, head, shard_rows=1)  # resume: the second window only
    tail = [dict(b, positions=[p + 12 for p in b["positions"]]) for b in bucketed(examples[12:], batch_size=4)]
    for b, idx in zip(tail, length_batches([len(i) for i, _ in examples[12:]], 4)):
        b["ids"] = [IDS[12 + i] for i in idx]
    store = write_store(tmp_path / "s", ext, head + tail, shard_rows=1)  # append: examples 12.. only
    assert store.ids == IDS
    assert torch.allclose(store.to_features().data, ref.data.float(), atol=1e-6 * ref.data.abs().max())


def test_a_plain_store_is_resumed_by_bucketed_batches_inside_a_window(model, examples, tmp_path):
    """Stores are in data order whatever the batching: a store of plain batches ending at example 10
    is completed by bucketed batches whose window 6..11 it half covers."""
    ext = extractor(model)
    ref = ext.extract(plain(examples))
    write_store(tmp_path / "s", ext, plain(examples[:10]), shard_rows=4)
    store = write_store(tmp_path / "s", ext, bucketed(examples, batch_size=4, window=6), shard_rows=4)
    assert store.ids == IDS
    assert torch.allclose(store.to_features().data, ref.data.float(), atol=1e-6 * ref.data.abs().max())


def test_resuming_with_other_positions_is_refused(model, examples, tmp_path):
    ext = extractor(model)
    write_store(tmp_path / "s", ext, bucketed(examples, batch_size=4, window=None))
    from fastinfluence.store.format import MismatchError

    with pytest.raises(MismatchError, match="differ from these batches"):
        write_store(
            tmp_path / "s",
            ext,
            [dict(b, positions=list(reversed(b["positions"]))) for b in bucketed(examples, batch_size=4, window=None)],
        )
    assert FeatureStore.open(tmp_path / "s").ids == IDS


# ----------------------------------------------------------------------------- command line


def test_extract_bucket_and_max_tokens_write_the_plain_store(request, tmp_path):
    from fastinfluence.cli import main

    model_dir, data_dir = request.getfixturevalue("cli_model_dir"), request.getfixturevalue("cli_data")
    common = ["--quiet", "extract", "--model", model_dir, "--data", data_dir / "train.jsonl", "--rank-in", 4]
    common = [*map(str, common), "--rank-out", "4", "--shard-rows", "4"]
    assert main([*common, "--batch-size", "3", "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--batch-size", "3", "--bucket", "--out", str(tmp_path / "bucket")]) == 0
    assert main([*common, "--max-tokens", "30", "--bucket-window", "4", "--out", str(tmp_path / "tokens")]) == 0
    ref = FeatureStore.open(tmp_path / "plain")
    for name in ("bucket", "tokens"):
        out = FeatureStore.open(tmp_path / name)
        assert out.ids == ref.ids
        assert torch.allclose(out.to_features().data, ref.to_features().data, atol=1e-5)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--max-tokens", "1"], "--max-tokens must be >= 2"),
        (["--max-tokens", "4"], r"example 't\d+' has \d+ tokens, more than --max-tokens 4: raise --max-tokens"),
        (["--bucket-window", "4"], "--bucket-window applies to length-bucketed batches: add --bucket"),
        (["--bucket", "--bucket-window", "0"], "--bucket-window must be >= 1"),
    ],
)
def test_bad_bucketing_flags_are_named(request, tmp_path, capsys, flags, match):
    from fastinfluence.cli import main

    model_dir, data_dir = request.getfixturevalue("cli_model_dir"), request.getfixturevalue("cli_data")
    argv = ["extract", "--model", str(model_dir), "--data", str(data_dir / "train.jsonl"), *flags]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_shards_of_older_stores_are_checked_against_their_padded_rows(model, examples, tmp_path, monkeypatch):
    """Shards written before ``content_kind`` hashed whole padded rows: those batches still resume, others not."""
    import fastinfluence.store.writer as writer
    from fastinfluence.store.format import MismatchError

    ext = extractor(model)
    batches = plain(examples)
    write_store(tmp_path / "s", ext, batches[:2], shard_rows=4)
    padded = writer._row_digests(batches, padded=True)
    scan = writer.scan_shards

    def as_written_before(root):
        out = []
        for e in scan(root):
            e = {k: v for k, v in e.items() if k != "content_kind"}
            out.append(dict(e, content=writer._content(padded, e["first"], e["rows"])))
        return out

    monkeypatch.setattr(writer, "scan_shards", as_written_before)
    assert write_store(tmp_path / "s", ext, batches, shard_rows=4).ids == IDS
    with pytest.raises(MismatchError, match="differ from these batches"):  # same examples, other padding
        write_store(tmp_path / "s", ext, bucketed(examples, batch_size=4, window=None), shard_rows=4)


def test_a_token_budget_alone_sets_the_batches_unless_batch_size_is_given(request):
    """Python's defaults are the command line's: 8 per batch without a budget, the budget alone with one."""
    from fastinfluence import data

    tok = request.getfixturevalue("data_tok")
    assert [len(b["input_ids"]) for b in data.batches(tok, records())][:1] == [8]
    budget = data.batches(tok, records(), max_tokens=400)
    assert len(budget) == 1 and len(budget[0]["input_ids"]) == 13  # 13 examples fit one 400-token batch
    capped = data.batches(tok, records(), max_tokens=400, batch_size=5)
    assert [len(b["input_ids"]) for b in capped] == [5, 5, 3]
