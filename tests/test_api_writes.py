"""The API's writes and inputs: ``score(matrix_path=...)`` never writes into a store, a model or
over a file without ``overwrite=True``, writes whole or not at all; ``score`` says what its
inputs must be; ``rapidun`` refuses matrices given in each other's place."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_store_support import TokenTableExtractor, make_batches

from fastinfluence import score, scoring, weights
from fastinfluence.store import FeatureStore, StoreError, write_store


@pytest.fixture
def stores(tmp_path):
    """(query Features (6 rows), the train store (12 rows in 2 shards))."""
    ext = TokenTableExtractor()
    train = write_store(tmp_path / "train", ext, make_batches(4, with_ids=True), shard_rows=6)
    return ext.extract(make_batches(2, seed=1)), train


# ----------------------------------------------------------------------------- matrix_path


@pytest.mark.parametrize("target", ["manifest.json", "shards/shard-000000000000.safetensors"])
def test_the_matrix_is_not_written_into_a_store(stores, target):
    query, train = stores
    victim = train.path / target
    before = victim.read_bytes()
    with pytest.raises(ValueError, match=rf"matrix_path= {victim} lies inside the feature store {train.path}"):
        score(query, train, matrix_path=victim)
    assert victim.read_bytes() == before
    assert FeatureStore.open(train.path).verify()["rows"] == 12


def test_the_matrix_replaces_an_existing_file_only_with_overwrite(stores, tmp_path):
    query, train = stores
    out = tmp_path / "S.npy"
    out.write_bytes(b"an earlier result")
    with pytest.raises(ValueError, match=rf"matrix_path= {out} exists; pass overwrite=True to replace it"):
        score(query, train, matrix_path=out)
    assert out.read_bytes() == b"an earlier result"
    res = score(query, train, matrix_path=out, overwrite=True)
    assert np.array_equal(np.load(out), score(query, train, matrix=True).matrix)
    assert Path(res.matrix.filename) == out.resolve()  # mapped from its final name


def test_a_failed_score_leaves_no_matrix_behind(stores, tmp_path, monkeypatch):
    query, train = stores

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "_stream", dies)
    with pytest.raises(KeyboardInterrupt):
        score(query, train, matrix_path=tmp_path / "S.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_a_full_disk_for_the_matrix_is_one_line_naming_it_and_the_fix(stores, tmp_path, monkeypatch):
    query, train = stores

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "S.npy"
    with pytest.raises(
        OSError,
        match=rf"cannot write the 6 x 12 float32 score matrix \(matrix_path=\) {out}: no space "
        "left on the device .*; free space there or choose a directory on another disk",
    ):
        score(query, train, matrix_path=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


# ----------------------------------------------------------------------------- what score takes


def test_score_refuses_batches_in_one_line(stores):
    query, train = stores
    with pytest.raises(
        TypeError, match="query must be Features .*, a FeatureStore or the path of a store directory, got list"
    ):
        score(make_batches(1), train)


def test_score_opens_store_paths(stores, tmp_path):
    query, train = stores
    qstore = write_store(tmp_path / "q", TokenTableExtractor(), make_batches(2, seed=1), shard_rows=6)
    by_path = score(str(qstore.path), str(train.path), topk=3)
    assert torch.equal(by_path.topk_values, score(query, train, topk=3).topk_values)


def test_score_on_a_directory_that_is_not_a_store_names_it(tmp_path):
    with pytest.raises(StoreError, match=rf"no feature store at {tmp_path}: manifest.json is missing"):
        score(str(tmp_path), str(tmp_path))


def test_one_aggregate_given_as_a_string_is_that_aggregate(stores):
    query, train = stores
    res = score(query, train, aggregates="mean")
    assert list(res.aggregates) == ["mean"]
    assert torch.equal(res.aggregates["mean"], score(query, train, aggregates=["mean"]).aggregates["mean"])


# ----------------------------------------------------------------------------- rapidun orientation


def test_rapidun_refuses_score_results_given_in_each_others_place():
    """Forget and retain sets of equal size: fr and rf have the same shape, so only the ids tell them apart."""
    ext = TokenTableExtractor()
    forget, retain = (ext.extract(make_batches(2, seed=s, with_ids=True)) for s in (1, 2))
    retain.ids = [f"r{i}" for i in range(len(retain))]
    ff, fr, rf, rr = (
        score(q, t, matrix=True) for q, t in ((forget, forget), (retain, forget), (forget, retain), (retain, retain))
    )
    assert weights.rapidun(ff, fr, rf, rr).forget.shape == (6,)
    with pytest.raises(
        ValueError, match="rapidun: ff and fr must share the forget train examples, but their ids differ"
    ):
        weights.rapidun(ff, rf, fr, rr)
