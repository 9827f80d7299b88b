"""FSDP2: every stage on a model sharded by ``fully_shard`` over 4 gloo ranks equals one process on
the whole model (float64: relative error below 1e-10; only the order of float64 sums differs).

One ``torchrun`` launch runs every stage (``sharded_worker.py``); each test checks one of them.
The ranks hold different numbers of batches, so every stage also checks that a rank out of
batches idles in step with the others (a hang ends the run with its stacks). The store tests
(two nodes, a killed rank) run 2 ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sharded_cases as cases
import torch
from helpers import one_thread, rel_err

import fastinfluence as fi
from fastinfluence.losses import reduce, sequence_nll
from fastinfluence.store import FeatureStore, write_store

HERE = Path(__file__).parent
WORLD = 4
TOL = 1e-10


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(out: Path, world: int, *args: str, timeout: int = 300) -> list[dict]:
    """Every rank's results of ``sharded_worker.py`` on ``world`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    proc = subprocess.run(
        [*cmd, str(HERE / "sharded_worker.py"), str(out), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [_features(torch.load(out / f"rank{r}.pt", weights_only=True)) for r in range(world)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Every rank's results of the sharded run, and its folder."""
    out = tmp_path_factory.mktemp("sharded")
    return _torchrun(out, WORLD), out


@pytest.fixture(scope="module")
def whole():
    return cases.model()


def test_the_ranks_ran_on_a_sharded_model(sharded):
    assert all(got["sharded"] for got in sharded[0])


@pytest.mark.parametrize("name", list(cases.CONFIGS))
def test_each_rank_extracts_its_own_examples_as_the_whole_model(sharded, whole, name):
    _check_features(sharded[0], whole, name)


def _check_features(ranks: list[dict], whole, name: str) -> None:
    for rank, got in enumerate(ranks):
        features = got[f"features/{name}"]
        extractor = fi.GradientExtractor(whole, cases.CONFIGS[name])
        with one_thread():
            ref = extractor.extract(cases.own_batches(rank), tokens=name == "blocks", covariances=name == "blocks")
        assert features.ids == ref.ids
        assert rel_err(features.data, ref.data) < TOL
        assert features.fingerprint == ref.fingerprint  # gathered: a sharded store opens against a whole model
        if name == "blocks":
            for layer, (A, G, n) in ref.stats.items():
                assert rel_err(features.stats[layer][0], A) < TOL and rel_err(features.stats[layer][1], G) < TOL
                assert features.stats[layer][2] == n
            assert torch.equal(features.tokens.offsets, ref.tokens.offsets)
            for layer in ref.tokens.a:
                assert rel_err(features.tokens.a[layer], ref.tokens.a[layer]) < TOL
                assert rel_err(features.tokens.g[layer], ref.tokens.g[layer]) < TOL


def test_a_store_written_by_the_ranks_equals_one_written_by_one_process(sharded, whole, tmp_path):
    two = FeatureStore.open(sharded[1] / "store")
    two.verify()
    with one_thread():
        one = write_store(
            tmp_path / "one",
            fi.GradientExtractor(whole, cases.CONFIGS["blocks"]),
            cases.shared_batches(),
            covariances=True,
            shard_rows=3,
        )
    assert two.metadata() == one.metadata()
    a, b = one.to_features(), two.to_features()
    assert b.ids == a.ids and rel_err(b.data, a.data) < TOL
    for layer, (A, G, n) in one.stats.items():
        assert rel_err(two.stats[layer][0], A) < TOL and rel_err(two.stats[layer][1], G) < TOL
        assert two.stats[layer][2] == n


def _reference(whole):
    config, shared, queries = cases.CONFIGS["blocks"], cases.shared_batches(), cases.query_batches()
    with one_thread():
        factors = fi.fit_kfac(whole, shared, "ekfac", config)
        return {
            "exact": fi.exact_scores(whole, queries, shared, config),
            "kfac": factors,
            "kfac/scores": fi.kfac_scores(whole, queries, shared, factors=factors, config=config),
            "normalizer": fi.Normalizer.fit(whole, shared, config).factors,
        }


@pytest.fixture(scope="module")
def reference(whole):
    return _reference(whole)


def test_exact_and_kfac_scores_equal_the_whole_models(sharded, reference):
    for got in sharded[0]:
        assert rel_err(got["exact"], reference["exact"]) < TOL
        assert rel_err(got["kfac/scores"], reference["kfac/scores"]) < TOL


def test_kfac_factors_are_summed_over_the_ranks(sharded, reference):
    for got in sharded[0]:
        stats = reference["kfac"].stats
        assert set(got["kfac/stats"]) == set(stats)
        for key in ("Lambda", "e_A", "e_G"):  # eigenvectors are defined up to sign; these are not
            for k in (k for k in stats if k.endswith(key)):
                assert rel_err(got["kfac/stats"][k], stats[k]) < TOL, k


def test_the_normalizer_fit_is_summed_over_the_ranks(sharded, reference):
    for got in sharded[0]:
        for layer, (r, c) in reference["normalizer"].items():
            assert rel_err(got["normalizer"][layer][0], r) < TOL and rel_err(got["normalizer"][layer][1], c) < TOL


def test_weighted_nll_and_its_gradient_equal_the_whole_models(sharded, whole):
    _check_nll(sharded[0], whole)


def _check_nll(ranks: list[dict], whole) -> None:
    whole.train()
    whole.zero_grad()
    for rank, got in enumerate(ranks):
        nll = sequence_nll(whole, cases.own_batches(rank)[0])
        loss = reduce(nll, cases.WEIGHTS[: len(nll.sum)])
        (loss / len(ranks)).backward()  # FSDP2 averages the ranks' gradients
        assert rel_err(got["nll"], nll.sum) < TOL
        assert rel_err(got["loss"], loss) < TOL
    whole.eval()
    for got in ranks:
        for name, p in whole.named_parameters():
            assert rel_err(got["grads"][name], p.grad) < TOL, name


def test_the_normalizer_from_a_sharded_models_optimizer_equals_the_whole_models(sharded):
    """Adam's exp_avg_sq of a sharded model are DTensors: gathered per parameter."""
    _check_adam(sharded[0])


def _check_adam(ranks: list[dict]) -> None:
    whole = cases.model()
    whole.train()
    for rank in range(len(ranks)):  # the gradient the ranks stepped on: the mean of theirs
        nll = sequence_nll(whole, cases.own_batches(rank)[0])
        (reduce(nll, cases.WEIGHTS[: len(nll.sum)]) / len(ranks)).backward()
    optimizer = cases.adam(whole)
    optimizer.step()
    whole.eval()
    ref = fi.Normalizer.from_optimizer(whole, optimizer, cases.CONFIGS["all"]).factors
    assert set(ref) == {l.name for l in fi.GradientExtractor(whole, cases.CONFIGS["all"]).layers}
    for got in ranks:
        for key in ("adam", "adam/state_dict"):
            assert set(got[key]) == set(ref)
            for layer, (r, c) in ref.items():
                assert rel_err(got[key][layer][0], r) < TOL and rel_err(got[key][layer][1], c) < TOL, (key, layer)


@pytest.mark.slow
def test_a_killed_rank_ends_its_peers_run_and_two_nodes_complete_the_store(whole, tmp_path):
    """Rank 1 dies (SIGKILL) mid-store; rank 0, blocked in a collective with it, exits with an error, not
    a hang. Run again, as two nodes on the loopback (``torchrun --nnodes 2 --nproc-per-node 1`` twice,
    as on a cluster): the shards written stay, only the missing examples are extracted, and the store
    equals one written by one process."""
    port = _free_port()
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    cmd = [sys.executable, str(HERE / "sharded_worker.py"), str(tmp_path), "--store-only", "--kill-at=4"]
    ranks = [  # no torchrun agent: nothing but the collectives tells rank 0 that its peer is gone
        subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        errs = [rank.communicate(timeout=300)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode not in (0, -signal.SIGKILL), errs[0][-2000:]
    assert "Timeout" not in errs[0], errs[0][-2000:]  # the worker's faulthandler: it hung in the collective
    store = tmp_path / "store"
    written = {p.name: p.stat().st_mtime_ns for p in (store / "shards").iterdir()}
    assert 0 < FeatureStore.open(store).num_rows < 14 and len(written) >= 2
    _two_nodes(tmp_path, "--store-only")
    two = FeatureStore.open(store)
    two.verify()
    after = {p.name: p.stat().st_mtime_ns for p in (store / "shards").iterdir()}
    assert all(after.get(name) == mtime for name, mtime in written.items())  # kept, not rewritten
    with one_thread():
        one = write_store(
            tmp_path / "one", fi.GradientExtractor(whole, cases.CONFIGS["blocks"]), cases.shared_batches()
        )
    assert two.metadata() == one.metadata() and two.ids == one.ids
    assert rel_err(two.to_features().data, one.to_features().data) < TOL


def _two_nodes(out: Path, *args: str) -> None:
    """``sharded_worker.py`` under two ``torchrun --nnodes=2 --nproc-per-node=1`` agents meeting on the loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    cmd += [f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=fastinfluence-test"]
    cmd += [str(HERE / "sharded_worker.py"), str(out), *args]
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(err[-2000:] for _, err in outputs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features(got: dict) -> dict:
    """The worker's plain dicts of features as objects with the attributes of ``Features``."""
    for key, value in got.items():
        if key.startswith("features/"):
            tokens = value["tokens"]
            got[key] = SimpleNamespace(**dict(value, tokens=None if tokens is None else SimpleNamespace(**tokens)))
    return got
