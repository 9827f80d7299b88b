"""One rank of the FSDP2 tests (``test_sharding.py``): every stage on a model sharded by ``fully_shard``.

Run under ``torchrun``; argv[1] is the output folder. Each rank saves what it computed in
``rank<r>.pt``; the test compares it with one process on the whole model. ``--store-only``:
only write the store of the shared batches (the multi-node and killed-rank tests; with
``--kill-at=<n>`` rank 1 kills itself as its n-th forward starts).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastinfluence as fi
from fastinfluence import distributed as dist
from fastinfluence import sharding
from fastinfluence.losses import reduce, sequence_nll
from fastinfluence.store import write_store

faulthandler.dump_traceback_later(150, exit=True)  # a lost peer ends the run with the stacks, not a hang
torch.set_num_threads(1)

import sharded_cases as cases  # noqa: E402


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """``fully_shard`` as a user applies it: each decoder layer, then the root."""
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def kill_at(model: torch.nn.Module, forward: int) -> None:
    """This rank kills itself (SIGKILL) as its ``forward``-th forward starts: a rank dying mid-store."""
    count = [0]

    def pre_hook(module, args):
        count[0] += 1
        if count[0] == forward:
            os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(pre_hook)


def main(out: Path, store_only: bool, kill: int | None = None) -> None:
    rank, world = dist.rank_world()
    model = shard(cases.model(), world)
    if store_only:
        if kill is not None and rank == 1:
            kill_at(model, kill)
        extractor = fi.GradientExtractor(model, cases.CONFIGS["blocks"])
        write_store(out / "store", extractor, cases.shared_batches(), shard_rows=2)
        dist.barrier()
        return
    got: dict = {"sharded": sharding.is_sharded(model)}
    own = cases.own_batches(rank)  # each rank its own examples, as many batches as its rank + 2
    for name, config in cases.CONFIGS.items():
        extractor = fi.GradientExtractor(model, config)
        got[f"features/{name}"] = _plain(extractor.extract(own, tokens=name == "blocks", covariances=name == "blocks"))
    config, shared, queries = cases.CONFIGS["blocks"], cases.shared_batches(), cases.query_batches()
    extractor = fi.GradientExtractor(model, cases.CONFIGS["blocks"])
    write_store(out / "store", extractor, cases.shared_batches(), covariances=True, shard_rows=3)
    got["exact"] = fi.exact_scores(model, queries, shared, config)
    factors = fi.fit_kfac(model, shared, "ekfac", config)
    got["kfac/stats"] = factors.stats
    got["kfac/scores"] = fi.kfac_scores(model, queries, shared, factors=factors, config=config)
    got["normalizer"] = fi.Normalizer.fit(model, shared, config).factors
    model.train()
    nll = sequence_nll(model, own[0])
    loss = reduce(nll, cases.WEIGHTS[: len(nll.sum)])
    loss.backward()
    got["nll"] = nll.sum.detach()
    got["loss"] = loss.detach()
    got["grads"] = {n: sharding.whole(p.grad) for n, p in model.named_parameters()}
    # Adam's second moments are DTensors (this rank's rows): the normaliser gathers them, from the
    # live optimizer and from its state dict
    optimizer = cases.adam(model)
    optimizer.step()
    got["adam"] = fi.Normalizer.from_optimizer(model, optimizer, cases.CONFIGS["all"]).factors
    got["adam/state_dict"] = fi.Normalizer.from_optimizer(model, optimizer.state_dict(), cases.CONFIGS["all"]).factors
    torch.save(got, out / f"rank{rank}.pt")
    dist.barrier()


def _plain(features) -> dict:
    """What the test reads of a Features, as tensors, lists and dicts: ``torch.load(weights_only=True)``."""
    tokens = features.tokens
    return {
        "ids": features.ids,
        "data": features.data,
        "fingerprint": features.fingerprint,
        "stats": features.stats,
        "tokens": None if tokens is None else {"offsets": tokens.offsets, "a": tokens.a, "g": tokens.g},
    }


if __name__ == "__main__":
    assert dist.init_from_env(), "run under torchrun with 2 or more processes"
    try:
        kill = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--kill-at=")), None)
        main(Path(sys.argv[1]), "--store-only" in sys.argv, kill)
    finally:
        torch.distributed.destroy_process_group()
