"""FeatureStore: layout, resume after SIGKILL, append, integrity checks, refusal of foreign stores."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_store_support import LAYERS, BatchTokenTableExtractor, TokenTableExtractor, make_batches, shuffled_windows

from fastinfluence import score
from fastinfluence.store import CorruptShardError, FeatureStore, MismatchError, StoreError, write_store

HERE = Path(__file__).parent


def assert_same_features(store: FeatureStore, ref):
    got = store.to_features()
    assert got.ids == ref.ids
    assert torch.equal(got.data, ref.data)
    assert torch.equal(got.norms, ref.norms)
    assert got.layout == ref.layout


def test_roundtrip_holds_features_norms_ids_tokens_and_covariances(tmp_path):
    ext = TokenTableExtractor()
    batches = make_batches(7, with_ids=True)
    ref = ext.extract(batches, tokens=True, covariances=True)
    store = write_store(tmp_path / "s", ext, batches, tokens=True, covariances=True, shard_rows=5)
    assert_same_features(store, ref)
    assert len(store.shards) == 4  # whole batches of 3 until >= 5 rows: 6, 6, 6, 3
    for row in (0, 4, 20):
        a, g = store.token_factors(row)
        o = ref.tokens.offsets
        for n in LAYERS:
            assert torch.equal(a[n], ref.tokens.a[n][o[row] : o[row + 1]])
            assert torch.equal(g[n], ref.tokens.g[n][o[row] : o[row + 1]])
    for n, (A, G, c) in store.stats.items():
        torch.testing.assert_close(A, ref.stats[n][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(G, ref.stats[n][1], rtol=1e-12, atol=0)
        assert c == ref.stats[n][2]


def test_batches_without_ids_get_their_stream_positions(tmp_path):
    store = write_store(tmp_path / "s", TokenTableExtractor(), make_batches(4), shard_rows=4)
    assert store.ids == list(range(12))


def test_chunks_never_cross_shards_and_cover_each_row_once(tmp_path):
    store = write_store(tmp_path / "s", TokenTableExtractor(), make_batches(9), shard_rows=7)
    chunks = list(store.iter_chunks(4))
    rows = [r for c in chunks for r in range(c.offset, c.offset + len(c.data))]
    assert rows == list(range(27))
    starts = {s["first"] for s in store.shards}
    for c in chunks:
        shard = max(s for s in starts if s <= c.offset)
        assert c.offset + len(c.data) <= min([s for s in starts if s > shard], default=27)
    assert torch.equal(store.rows([26, 0, 13]), store.to_features().data[[26, 0, 13]])


def test_appending_new_batches_equals_one_extraction(tmp_path):
    ext = TokenTableExtractor()
    batches = make_batches(8, with_ids=True)
    write_store(tmp_path / "s", ext, batches[:5], tokens=True, shard_rows=4)
    store = write_store(tmp_path / "s", ext, batches, tokens=True, shard_rows=4)
    assert_same_features(store, ext.extract(batches))
    assert store.ids == [f"ex{i}" for i in range(24)]


def test_extracting_other_batches_into_a_store_is_refused(tmp_path):
    ext = TokenTableExtractor()
    write_store(tmp_path / "s", ext, make_batches(3, with_ids=True), shard_rows=4)
    with pytest.raises(MismatchError, match="ids or tokens differ"):
        write_store(tmp_path / "s", ext, make_batches(3, with_ids=True, seed=1)[::-1], shard_rows=4)


@pytest.mark.parametrize(
    "other, named",
    [
        (TokenTableExtractor(vocab=41), "model"),
        (TokenTableExtractor(layers={"model.layers.0.mlp": (3, 5)}), "layer set"),
        (TokenTableExtractor(seed=3), "projection config"),
    ],
)
def test_store_from_another_model_layer_set_or_config_is_refused(tmp_path, other, named):
    ext = TokenTableExtractor()
    write_store(tmp_path / "s", ext, make_batches(2), shard_rows=4)
    with pytest.raises(MismatchError, match=named):
        FeatureStore.open(tmp_path / "s", expect=other.metadata())
    with pytest.raises(MismatchError, match=named):
        write_store(tmp_path / "s", other, make_batches(2), shard_rows=4)
    FeatureStore.open(tmp_path / "s", expect=ext.metadata())


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_named_by_verify_and_by_reading(tmp_path):
    store = write_store(tmp_path / "s", TokenTableExtractor(), make_batches(6), shard_rows=6)
    victim = tmp_path / "s" / "shards" / store.shards[1]["file"]
    dtype, shape, begin, end = store._shard(1).spec("features")
    data = bytearray(victim.read_bytes())
    data[begin + 7] ^= 0x5A
    victim.write_bytes(bytes(data))
    store = FeatureStore.open(tmp_path / "s")
    with pytest.raises(CorruptShardError, match=victim.name):
        store.verify()
    with pytest.raises(CorruptShardError, match=victim.name):
        list(store.iter_chunks(4))


def test_truncated_shard_is_named_by_verify_and_by_reading(tmp_path):
    store = write_store(tmp_path / "s", TokenTableExtractor(), make_batches(6), shard_rows=6)
    victim = tmp_path / "s" / "shards" / store.shards[2]["file"]
    victim.write_bytes(victim.read_bytes()[:-10])
    store = FeatureStore.open(tmp_path / "s")
    with pytest.raises(CorruptShardError, match=f"{victim.name} is .*truncated"):
        store.verify()
    with pytest.raises(CorruptShardError, match=victim.name):
        store.rows([13])


def test_corrupted_token_file_is_detected_by_verify(tmp_path):
    store = write_store(tmp_path / "s", TokenTableExtractor(), make_batches(3), tokens=True, shard_rows=100)
    victim = tmp_path / "s" / "shards" / store.shards[0]["tokens"]["file"]
    _flip_byte(victim, 3)
    with pytest.raises(CorruptShardError, match=victim.name):
        FeatureStore.open(tmp_path / "s").verify()


def test_store_reads_from_read_only_files(tmp_path):
    store = write_store(tmp_path / "s", TokenTableExtractor(), make_batches(4), shard_rows=4)
    ref = store.to_features()
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    for p in files:
        p.chmod(stat.S_IRUSR)
    try:
        store = FeatureStore.open(tmp_path / "s")
        store.verify()
        assert_same_features(store, ref)
        assert torch.equal(store.shard_features(0), ref.data[: store.shards[0]["rows"]])
    finally:
        for p in files:
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_incomplete_store_and_missing_store_are_reported(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "nothing")
    write_store(tmp_path / "s", TokenTableExtractor(), make_batches(4), shard_rows=3)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["shards"][1]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="examples 3..6 are missing"):
        FeatureStore.open(tmp_path / "s")


class _DiesAfter(TokenTableExtractor):
    """Stops the extraction with an error after ``n`` batches, as a kill would (no manifest update)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def iter_features(self, batches, **kw):
        for i, f in enumerate(super().iter_features(batches, **kw)):
            if i == self.n:
                raise KeyboardInterrupt
            yield f


def test_interrupted_store_reports_and_scores_the_rows_its_shards_hold(tmp_path):
    """The manifest of a run is written before its shards: after a kill the shards on disk are the
    truth, for the incomplete-store message, for ``allow_incomplete`` scoring and for resume."""
    batches = make_batches(6, with_ids=True)  # 18 examples, shards of 3
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", _DiesAfter(4), batches, shard_rows=3)
    store = FeatureStore.open(tmp_path / "s")
    assert not store.complete and store.num_rows == 12 and store.expected_rows == 18
    ref = TokenTableExtractor().extract(batches)
    assert torch.equal(store.rows(range(12)).double(), ref.data[:12].double())
    with pytest.raises(StoreError, match=r"is incomplete \(12 of 18 examples\)"):
        score(ref, store, topk=2)
    partial = score(ref, store, topk=2, allow_incomplete=True)
    assert partial.topk_indices.shape == (18, 2) and int(partial.topk_indices.max()) < 12
    done = write_store(tmp_path / "s", TokenTableExtractor(), batches, shard_rows=3)
    assert done.complete and done.num_rows == 18
    assert_same_features(done, ref)


def test_interrupted_store_takes_the_gapless_prefix_and_is_complete_when_every_row_is_there(tmp_path):
    root = tmp_path / "s"
    write_store(root, TokenTableExtractor(), make_batches(6, with_ids=True), shard_rows=3)  # 18 rows, 6 shards
    manifest = json.loads((root / "manifest.json").read_text())
    files = [s["file"] for s in manifest["shards"]]
    # killed after its last shard, before the final manifest: complete, as close() would have said
    (root / "manifest.json").write_text(json.dumps(dict(manifest, shards=[], num_rows=0, complete=False)))
    store = FeatureStore.open(root)
    assert store.complete and store.num_rows == 18 and store.verify()["complete"]
    # a gap on disk (the range of a rank that died): only the rows before it
    (root / "shards" / files[2]).unlink()
    store = FeatureStore.open(root)
    assert not store.complete and store.num_rows == 6
    # a complete manifest is the truth: shard files it does not list are not read
    (root / "manifest.json").write_text(json.dumps(dict(manifest, shards=manifest["shards"][:2], num_rows=6)))
    assert FeatureStore.open(root).num_rows == 6
    # on the incomplete path the shard files themselves are checked: a truncated one is named
    (root / "manifest.json").write_text(json.dumps(dict(manifest, shards=[], num_rows=0, complete=False)))
    shard = root / "shards" / files[0]
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(CorruptShardError, match=rf"{files[0]} holds .* bytes where its header needs .*truncated"):
        FeatureStore.open(root)


# The killed writers are real processes, forked one per run by a driver that imported torch and the
# store once (an interpreter and its imports per run would be most of these tests' time). A run
# prints "start <pid>" as its write begins; the driver reports each run's exit code ("exit <code>",
# -9 after SIGKILL) once it has ended.
_DRIVER = """
import os, sys, traceback
import fastinfluence.store, test_store_support  # noqa: F401
worker = sys.argv[1]
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sys.argv = ["-c", *line.split()]
            exec(compile(worker, "<worker>", "exec"), {"__name__": "__main__"})
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _kill_runs(worker: str, args: list, delays: list) -> list[int]:
    """Runs ``worker`` (argv: ``args``) once per delay, each killed (SIGKILL) that many seconds after it
    starts its write, or left to finish for None; their exit codes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    codes = []
    try:
        for delay in delays:
            driver.stdin.write(" ".join(map(str, args)) + "\n")
            driver.stdin.flush()
            started = driver.stdout.readline().split()
            assert started[:1] == ["start"], started
            if delay is not None:
                time.sleep(delay)
                os.kill(int(started[1]), signal.SIGKILL)
            ended = driver.stdout.readline().split()
            assert ended[:1] == ["exit"], ended
            codes.append(int(ended[1]))
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
    return codes


_WORKER = """
import os, sys
from fastinfluence.store import write_store
from test_store_support import TokenTableExtractor, make_batches
ext, batches = TokenTableExtractor(delay=0.02), make_batches(40, with_ids=True)
print("start", os.getpid(), flush=True)
write_store(sys.argv[1], ext, batches, tokens=True, covariances=True, shard_rows=5)
"""


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path):
    path = tmp_path / "s"
    rng = random.Random(5)
    codes = _kill_runs(_WORKER, [path], [rng.uniform(0.05, 0.3) for _ in range(4)] + [None])
    kills = codes.count(-signal.SIGKILL)
    assert codes[-1] == 0
    assert kills >= 3, "the kills must land during extraction"
    ext = TokenTableExtractor()
    batches = make_batches(40, with_ids=True)
    ref = ext.extract(batches, tokens=True, covariances=True)
    store = FeatureStore.open(path)
    store.verify()
    assert_same_features(store, ref)
    assert len(set(store.ids)) == store.num_rows == 120
    assert not list(path.rglob("*.tmp-*"))
    for n, (A, G, c) in store.stats.items():
        torch.testing.assert_close(A, ref.stats[n][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(G, ref.stats[n][1], rtol=1e-12, atol=0)
        assert c == ref.stats[n][2]
    uninterrupted = write_store(tmp_path / "u", ext, batches, tokens=True, covariances=True, shard_rows=5)
    assert [s["sha256"] for s in uninterrupted.shards] == [s["sha256"] for s in store.shards]


_BATCH_WORKER = """
import os, sys
from fastinfluence.store import write_store
from test_store_support import BatchTokenTableExtractor, make_batches, shuffled_windows
ext = BatchTokenTableExtractor(delay=0.02, log=sys.argv[2])
batches = shuffled_windows(make_batches(40, with_ids=True), window=8)
print("start", os.getpid(), flush=True)
write_store(sys.argv[1], ext, batches, tokens=True, covariances=True, shard_rows=30)
"""


def test_sigkill_inside_windows_loses_only_the_batch_in_flight(tmp_path):
    """Batches reordered within windows of 8 (24 examples) and shards of >= 30 rows: a kill loses at
    most the batch being computed, since every computed batch is committed at once; the resumed store
    is byte for byte the uninterrupted one, and no part file is left."""
    path, log = tmp_path / "s", tmp_path / "computed.txt"
    rng = random.Random(7)
    codes = _kill_runs(_BATCH_WORKER, [path, log], [rng.uniform(0.1, 0.35) for _ in range(3)] + [None])
    kills = codes.count(-signal.SIGKILL)
    assert codes[-1] == 0
    assert kills >= 2, "the kills must land during extraction"
    computed = log.read_text().splitlines()
    assert len(computed) <= 40 + kills  # each kill recomputes at most its batch in flight
    # every example computed (logged by id: a resumed run's batch positions count from its first window)
    assert {i for line in computed for i in json.loads(line)} == {f"ex{k}" for k in range(120)}
    batches = shuffled_windows(make_batches(40, with_ids=True), window=8)
    ext = BatchTokenTableExtractor()
    uninterrupted = write_store(tmp_path / "u", ext, batches, tokens=True, covariances=True, shard_rows=30)
    store = FeatureStore.open(path)
    store.verify()
    assert [s["sha256"] for s in uninterrupted.shards] == [s["sha256"] for s in store.shards]
    assert store.ids == [f"ex{i}" for i in range(120)]
    assert_same_features(store, TokenTableExtractor().extract(make_batches(40, with_ids=True)))
    assert not list(path.rglob("part-*")) and not list(path.rglob("*.tmp-*"))


class _StopsAfter(BatchTokenTableExtractor):
    """Raises after computing ``n`` batches, as a kill inside the loop would."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def iter_batch_features(self, batches, **kw):
        computed = 0
        for positions, f, closes in super().iter_batch_features(batches, **kw):
            if f is not None:
                if computed == self.n:
                    raise KeyboardInterrupt
                computed += 1
            yield positions, f, closes


@pytest.mark.parametrize("window", [4, 1])
def test_a_stop_after_k_batches_resumes_with_exactly_the_uncommitted_batches(tmp_path, window):
    """Stopped after 6 of 10 batches, before any shard (shard_rows above the store's size): the resumed
    run computes the other 4 only; with windows of 4 bucketed batches and with plain batches."""
    plain = make_batches(10, with_ids=True)
    batches = shuffled_windows(plain, window=window, seed=2) if window > 1 else plain
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", _StopsAfter(6), batches, tokens=True, covariances=True, shard_rows=100)
    assert len(list((tmp_path / "s" / "shards").glob("part-*.safetensors"))) == 6
    assert FeatureStore.open(tmp_path / "s").num_rows == 0
    log = tmp_path / "log.txt"
    store = write_store(
        tmp_path / "s", BatchTokenTableExtractor(log=log), batches, tokens=True, covariances=True, shard_rows=100
    )
    assert len(log.read_text().splitlines()) == 4
    ref = write_store(
        tmp_path / "u", BatchTokenTableExtractor(), batches, tokens=True, covariances=True, shard_rows=100
    )
    assert [s["sha256"] for s in ref.shards] == [s["sha256"] for s in store.shards]
    assert_same_features(store, TokenTableExtractor().extract(plain))
    assert not list((tmp_path / "s" / "shards").glob("part-*"))


def test_a_committed_batch_of_other_examples_is_refused(tmp_path):
    batches = shuffled_windows(make_batches(8, with_ids=True), window=4)
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", _StopsAfter(3), batches, shard_rows=100)
    other = shuffled_windows(make_batches(8, seed=5, with_ids=True), window=4)
    with pytest.raises(MismatchError, match=r"computed batch part-\d+\.safetensors .* differ from these batches"):
        write_store(tmp_path / "s", BatchTokenTableExtractor(), other, shard_rows=100)


def rebatch(batches, size):
    """The same examples, cut into batches of ``size``."""
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "attention_mask", "labels")}
    ids = [i for b in batches for i in b["ids"]]
    return [dict({k: v[s : s + size] for k, v in cat.items()}, ids=ids[s : s + size]) for s in range(0, len(ids), size)]


def test_resuming_with_another_batch_size_fills_exactly_the_missing_rows(tmp_path):
    ext, batches = TokenTableExtractor(), make_batches(10, with_ids=True)
    write_store(tmp_path / "s", ext, batches[:4], tokens=True, shard_rows=6)
    store = write_store(tmp_path / "s", ext, rebatch(batches, 5), tokens=True, shard_rows=6)
    assert [s["first"] for s in store.shards] == [0, 6, 12, 20]  # resumed inside the batch of rows 10..15
    assert_same_features(store, ext.extract(batches))
    ref = ext.extract(batches, tokens=True).tokens
    a, _ = store.token_factors(13)
    assert torch.equal(a["model.layers.0.mlp"], ref.a["model.layers.0.mlp"][ref.offsets[13] : ref.offsets[14]])


def test_resuming_covariances_inside_a_batch_is_refused(tmp_path):
    ext, batches = TokenTableExtractor(), make_batches(10, with_ids=True)
    write_store(tmp_path / "s", ext, batches[:4], covariances=True, shard_rows=6)
    with pytest.raises(StoreError, match="same batch size"):
        write_store(tmp_path / "s", ext, rebatch(batches, 5), covariances=True, shard_rows=6)


def test_resuming_with_other_examples_without_ids_is_refused(tmp_path):
    """Ids default to positions; the shards also record a digest of each example's tokens."""
    a = make_batches(4)
    b = make_batches(4, seed=99)
    write_store(tmp_path / "s", TokenTableExtractor(), a, shard_rows=3)
    with pytest.raises(MismatchError, match="tokens differ"):
        write_store(tmp_path / "s", TokenTableExtractor(), b, shard_rows=3)


def test_appending_to_a_store_of_another_format_version_is_refused(tmp_path):
    import json

    write_store(tmp_path / "s", TokenTableExtractor(), make_batches(2), shard_rows=3)
    manifest = tmp_path / "s" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(m, version=99)))
    with pytest.raises(StoreError, match="version 99"):
        write_store(tmp_path / "s", TokenTableExtractor(), make_batches(3), shard_rows=3)


def test_features_and_store_implement_the_source_protocol_with_the_same_member_kinds(tmp_path):
    import inspect

    from fastinfluence.features import FeatureProducer, FeatureSource

    ext = TokenTableExtractor()
    batches = make_batches(3)
    mem = ext.extract(batches, covariances=True)
    store = write_store(tmp_path / "s", ext, batches, covariances=True)
    assert isinstance(ext, FeatureProducer)
    for src in (mem, store):
        assert isinstance(src, FeatureSource)
    methods = [n for n, v in vars(FeatureSource).items() if inspect.isfunction(v) and not n.startswith("_")]
    for name in methods:
        assert callable(getattr(mem, name)) and callable(getattr(store, name)), name
    for name in ("stats", "norms", "dim", "dtype", "num_rows", "layout", "ids"):
        assert not callable(getattr(mem, name)) and not callable(getattr(store, name)), name
    assert store.stats.keys() == mem.stats.keys()
    assert [c.offset for c in mem.iter_chunks(4, 2, 9)] == [c.offset for c in store.iter_chunks(4, 2, 9)] == [2, 6]


def test_writer_plans_only_the_missing_examples_and_the_producer_starts_there(tmp_path):
    from fastinfluence.store import StoreWriter

    ext = TokenTableExtractor()
    batches = make_batches(5)  # 3 examples per batch
    write_store(tmp_path / "s", ext, batches[:2], shard_rows=3)
    writer = StoreWriter(tmp_path / "s", ext.metadata(), shard_rows=3)
    runs = writer.plan(batches)
    assert [(r.first, r.stop, r.skip, len(r.batches)) for r in runs] == [(6, 15, 0, 3)]
    for run in runs:
        writer.write(run, ext.iter_features(run.batches, skip_examples=run.skip))
    assert_same_features(writer.close(), ext.extract(batches))
