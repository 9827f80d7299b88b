"""Preconditioned scores equal q^T H^-1 x with H built densely, for every kind."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from test_store_support import TokenTableExtractor, make_batches

from fastinfluence.precondition import fit, load_or_fit
from fastinfluence.scoring import score, self_influence
from fastinfluence.store import write_store


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "s"
    return write_store(path, TokenTableExtractor(), make_batches(9, with_ids=True), covariances=True, shard_rows=7)


@pytest.fixture(scope="module")
def query():
    return TokenTableExtractor().extract(make_batches(1, batch_size=4, seed=7))


def dense_H(kind, mem, stats, damping=None, ratio=0.1):
    """Block-diagonal (D, D) float64 curvature of the given kind, damped as documented."""
    X = mem.data.double()
    blocks = []
    for name, sl in mem.layout.items():
        x = X[:, sl.start : sl.stop]
        ko, ki = sl.shape
        damp = (lambda ev: damping) if damping is not None else (lambda ev: ratio * float(ev.mean()))
        if kind == "diagonal":
            m = (x * x).mean(0)
            H = torch.diag(m + damp(m))
        elif kind == "full":
            F = x.T @ x / len(x)
            H = F + damp(torch.linalg.eigvalsh(F)) * torch.eye(len(F), dtype=torch.float64)
        else:
            A, G, c = stats[name]
            CA, CG = A / c, G / len(x)  # per token and per example (the per-example Fisher's scale)
            if kind == "kfac":
                H = torch.kron(
                    CG + damp(torch.linalg.eigvalsh(CG)) * torch.eye(ko, dtype=torch.float64),
                    CA + damp(torch.linalg.eigvalsh(CA)) * torch.eye(ki, dtype=torch.float64),
                )
            else:
                QA, QG = torch.linalg.eigh(CA).eigenvectors, torch.linalg.eigh(CG).eigenvectors
                Qk = torch.kron(QG, QA)
                s = ((x @ Qk) ** 2).mean(0)
                H = Qk @ torch.diag(s + damp(s)) @ Qk.T
        blocks.append(H)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("kind", ["diagonal", "kfac", "ekfac", "full"])
@pytest.mark.parametrize("damping", [None, 0.3])
def test_preconditioned_scores_equal_the_dense_formula(train, query, tmp_path, kind, damping):
    mem = train.to_features()
    H = dense_H(kind, mem, train.stats, damping)
    S_ref = query.data.double() @ torch.linalg.solve(H, mem.data.double().T)
    res = score(query, train, precondition=kind, damping=damping, topk=3, chunk_rows=4, matrix_path=tmp_path / "S.npy")
    assert rel_err(torch.from_numpy(res.matrix[:]), S_ref) < 1e-4  # float32 scoring of a damped, well-conditioned solve
    assert res.precondition == kind


def test_preconditioned_self_influence_is_the_dense_quadratic_form(train):
    mem = train.to_features()
    X = mem.data.double()
    ref = (X * torch.linalg.solve(dense_H("kfac", mem, train.stats), X.T).T).sum(1)
    assert rel_err(self_influence(train, precondition="kfac", chunk_rows=5), ref) < 1e-6


def test_in_memory_features_fit_the_same_preconditioner(train, query):
    mem = TokenTableExtractor().extract(make_batches(9, with_ids=True), covariances=True)
    for kind in ("diagonal", "ekfac"):
        a, b = fit(mem, kind).apply(query.data), fit(train, kind).apply(query.data)
        assert rel_err(a, b) < 1e-12


def test_fitted_statistics_are_saved_beside_the_store_and_refitted_after_append(tmp_path, query):
    ext, batches = TokenTableExtractor(), make_batches(6, with_ids=True)
    store = write_store(tmp_path / "s", ext, batches[:4], covariances=True, shard_rows=6)
    first = load_or_fit(store, "ekfac")
    saved = tmp_path / "s" / "precondition" / "ekfac.safetensors"
    stamp = saved.stat().st_mtime_ns
    assert torch.equal(load_or_fit(store, "ekfac").apply(query.data), first.apply(query.data))
    assert saved.stat().st_mtime_ns == stamp
    store = write_store(tmp_path / "s", ext, batches, covariances=True, shard_rows=6)
    assert rel_err(load_or_fit(store, "ekfac").apply(query.data), fit(store, "ekfac").apply(query.data)) < 1e-12
    assert saved.stat().st_mtime_ns != stamp


def test_kfac_without_covariances_and_full_on_wide_layers_are_refused(tmp_path):
    store = write_store(tmp_path / "s", TokenTableExtractor(), make_batches(2), shard_rows=6)
    with pytest.raises(Exception, match="covariances=True"):
        fit(store, "kfac")
    wide = TokenTableExtractor(layers={"w": (70, 70)}).extract(make_batches(1))
    with pytest.raises(ValueError, match="at most 4096"):
        fit(wide, "full")


def test_kfac_has_the_scale_of_the_per_example_fisher(train):
    """trace(C_G (x) C_A) is near trace(E_i[phi phi^T]), the scale diagonal, ekfac and full use."""
    p, mem = fit(train, "kfac"), train.to_features()
    for name, sl in mem.layout.items():
        x = mem.data.double()[:, sl.start : sl.stop]
        fisher = float((x * x).sum(1).mean())
        kron = float(torch.trace(p.stats[f"{name}.C_G"]) * torch.trace(p.stats[f"{name}.C_A"]))
        assert 0.2 < kron / fisher < 5, (name, kron / fisher)


@pytest.mark.parametrize("kind", ["diagonal", "kfac", "ekfac", "full"])
def test_a_layer_with_zero_statistics_keeps_scores_finite(train, query, kind):
    """E.g. LoRA A while B is still zero: its curvature is 0 and so is the default damping."""
    p = fit(train, kind)
    first = next(iter(train.layout))
    for key in p.stats:
        if key.startswith(first + ".") and not key.endswith(("Q_A", "Q_G")):
            p.stats[key] = torch.zeros_like(p.stats[key])
    out = p.apply(query.data)
    assert torch.isfinite(out).all()
