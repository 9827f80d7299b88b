"""A store is written only where it may be, removes only its own temporary files, and refuses
crafted manifests and links: what a user's mistake or an untrusted store directory must not do."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from test_store_support import TokenTableExtractor, make_batches

from fastinfluence.outputs import OutputError
from fastinfluence.store import CorruptShardError, FeatureStore, MismatchError, StoreError, write_store


def _store(root: Path, batches: int = 2, shard_rows: int = 100) -> FeatureStore:
    return write_store(root, TokenTableExtractor(), make_batches(batches, with_ids=True), shard_rows=shard_rows)


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- where a store is written


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda d: (d / "thesis.tmp-final").write_text("chapter 1"), "a non-empty directory that is not a feature"),
        (lambda d: (d / "config.json").write_text("{}"), "a model directory"),
    ],
    ids=["user files", "model"],
)
def test_a_store_is_not_written_into_a_directory_of_other_files(tmp_path, make, named):
    d = tmp_path / "mine"
    d.mkdir()
    make(d)
    before = _listing(d)
    with pytest.raises(OutputError, match=rf"store {d} is {named}.*give a new or empty directory"):
        _store(d)
    assert _listing(d) == before and sorted(p.name for p in d.iterdir()) == sorted(before)


def test_a_store_is_not_written_inside_another_store(tmp_path):
    _store(tmp_path / "s")
    with pytest.raises(OutputError, match=rf"lies inside the feature store {tmp_path / 's'}"):
        _store(tmp_path / "s" / "shards" / "nested")
    assert not (tmp_path / "s" / "shards" / "nested").exists()


def test_a_store_killed_before_its_first_manifest_is_resumed(tmp_path):
    """What the writer leaves before its first manifest (a dead run's lock, an empty shards
    directory, a temporary manifest) is a store of ours, not a directory of other files."""
    root = tmp_path / "s"
    (root / "shards").mkdir(parents=True)
    (root / ".lock").write_text(json.dumps({"run": "dead", "pid": 2**22 + 1, "host": os.uname().nodename}))
    (root / ".manifest.json.fi-tmp-4194305-0123abcd").write_text("{")
    store = _store(root)
    assert store.num_rows == 6 and sorted(p.name for p in root.iterdir()) == ["manifest.json", "shards"]


def test_the_writer_removes_only_the_temporary_files_it_names(tmp_path):
    root = tmp_path / "s"
    _store(root, batches=1)
    users = [root / "thesis.tmp-final", root / "shards" / "notes.tmp-1", root / "shards" / "shard-x.safetensors.tmp-1"]
    for p in users:
        p.write_text("mine")
    ours = [root / "shards" / ".shard-000000000003.safetensors.fi-tmp-77-00c0ffee", root / "manifest.json.tmp-77"]
    for p in ours:
        p.write_bytes(b"half")
    store = _store(root, batches=2)  # extends the store
    assert store.num_rows == 6
    assert all(p.read_text() == "mine" for p in users)
    assert not any(p.exists() for p in ours)


def test_a_store_whose_shards_directory_links_elsewhere_is_not_written(tmp_path):
    root, elsewhere = tmp_path / "s", tmp_path / "elsewhere"
    _store(root, batches=1)
    shutil.move(root / "shards", elsewhere)
    (root / "shards").symlink_to(elsewhere)
    (elsewhere / "draft.tmp-2").write_text("mine")
    before = _listing(elsewhere)
    with pytest.raises(StoreError, match=rf"{root / 'shards'} is a link to {elsewhere}"):
        _store(root, batches=2)
    assert _listing(elsewhere) == before


def test_a_full_disk_while_writing_a_shard_is_one_line_naming_the_file_and_resumes(tmp_path, monkeypatch):
    root = tmp_path / "s"
    fsync = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".shard-000000000003"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        OSError,
        match=r"cannot write the file .*shard-000000000003\.safetensors: no space left on the "
        r"device \(nothing half-written was kept\); free space there or choose a directory",
    ):
        _store(root, batches=3, shard_rows=3)
    assert not [p for p in root.rglob("*") if "tmp" in p.name]
    monkeypatch.setattr(os, "fsync", fsync)
    assert _store(root, batches=3, shard_rows=3).num_rows == 9


# ----------------------------------------------------------------------------- crafted stores


@pytest.mark.parametrize("name", ["../../x.safetensors", "ABSOLUTE"], ids=["dotdot", "absolute"])
def test_a_shard_name_outside_the_store_is_refused(tmp_path, name):
    root = _store(tmp_path / "s").path
    outside = tmp_path / "x.safetensors"
    shutil.copy(root / "shards" / "shard-000000000000.safetensors", outside)
    name = str(outside) if name == "ABSOLUTE" else name

    def crafted(m):
        m["shards"][0]["file"] = name

    _edit_manifest(root, crafted)
    with pytest.raises(StoreError, match=rf"store {root}: the manifest's shards\[0\]\.file is '{name}', not a shard"):
        FeatureStore.open(root)


def test_a_shard_file_linking_out_of_the_store_is_refused(tmp_path):
    root = _store(tmp_path / "s").path
    shard = root / "shards" / "shard-000000000000.safetensors"
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(StoreError, match=rf"{shard} \(the manifest's shards\[0\]\.file\) links to .*outside the store"):
        FeatureStore.open(root)


def _fewer_rows(m):
    """The manifest lies: its first shard holds one row less (sizes and checksums untouched)."""
    s = m["shards"][0]
    s["rows"], s["ids"], m["num_rows"] = s["rows"] - 1, s["ids"][:-1], m["num_rows"] - 1


def test_a_manifest_claiming_fewer_rows_than_its_shard_is_refused_on_open(tmp_path):
    root = _store(tmp_path / "s").path
    _edit_manifest(root, _fewer_rows)
    with pytest.raises(
        CorruptShardError,
        match=r"shard shard-000000000000.safetensors holds features of shape "
        r"\[6, 23\] .* where its manifest entry says \[5, 23\]",
    ):
        FeatureStore.open(root)


def test_a_manifest_claiming_fewer_rows_than_its_shard_fails_verify(tmp_path):
    root = _store(tmp_path / "s").path
    _edit_manifest(root, _fewer_rows)
    store = FeatureStore(root, json.loads((root / "manifest.json").read_text()))  # what open() returned before
    with pytest.raises(CorruptShardError, match="holds features of shape"):
        store.verify()


def test_a_manifest_entry_without_its_fields_is_one_line(tmp_path):
    root = _store(tmp_path / "s").path
    _edit_manifest(root, lambda m: m["shards"][0].pop("rows"))
    with pytest.raises(StoreError, match=r"manifest.json is malformed \(shards\[0\]\.rows is None, not int\)"):
        FeatureStore.open(root)


# ----------------------------------------------------------------------------- open(expect=)


def test_open_takes_an_extractor_as_what_the_store_must_match(tmp_path):
    root = _store(tmp_path / "s").path
    assert FeatureStore.open(root, expect=TokenTableExtractor()).num_rows == 6
    with pytest.raises(MismatchError, match="different projection config"):
        FeatureStore.open(root, expect=TokenTableExtractor(seed=1))


def test_open_names_what_expect_takes(tmp_path):
    root = _store(tmp_path / "s").path
    with pytest.raises(TypeError, match="expect must be a GradientExtractor, Features, a FeatureStore or their "):
        FeatureStore.open(root, expect=42)
