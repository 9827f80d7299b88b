"""Trainers under ``accelerate launch`` with an FSDP2 config on 2 gloo ranks equal one process training the
same global batches: the callback's interval stores, ``UnlearnTrainer``'s per-step losses, weights and
``evaluate`` of the unlearned model, and the open-unlearning trainers' (GradDiff, NPO, RapidUn) per-step losses.

One launch trains every case (``sharded_trainer_worker.py``); the reference runs the same code
in this process. The models are float64, but Llama's RMSNorm rounds its input through float32,
so two runs that sum in another order agree to float32's precision after a step: losses and
weights within 1e-6 relative. The callback's first interval (the same weights in both runs)
holds to float64's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sharded_cases as cases
import sharded_trainer_worker as worker
import torch
from helpers import one_thread, rel_err

from fastinfluence import FeatureStore, GradientExtractor
from fastinfluence.callback import interval_stores

HERE = Path(__file__).parent
WORLD = 2
F32 = 1e-6  # after a training step (see the module docstring)
F64 = 1e-10  # before any step


def _launch_cmd(port: int, script: Path, *args: str) -> list[str]:
    """``accelerate launch`` with FSDP2: each decoder layer, then the root (accelerate's transformer auto-wrap)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={WORLD}", "--num_machines=1"]
    cmd += ["--mixed_precision=no", "--dynamo_backend=no", "--use_fsdp", "--fsdp_version=2"]
    cmd += ["--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer"]
    return [*cmd, f"--main_process_port={port}", str(script), *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the 2-rank run's results, its folder), (one process's results, its folder)."""
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        pytest.skip("transformers without train_sampling_strategy (the same batches in both runs need it)")
    two = tmp_path_factory.mktemp("two")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = _launch_cmd(_free_port(), HERE / "sharded_trainer_worker.py", str(two))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = tmp_path_factory.mktemp("one")
    with one_thread():
        ref = worker.run(one, world=1)
    return (torch.load(two / "sharded.pt", weights_only=True), two), (ref, one)


def test_every_trainer_ran_on_a_sharded_model(runs):
    (got, _), (ref, _) = runs
    cases = ["callback/accelerate", "callback/user", "unlearn", *worker.HANDLERS]
    assert all(got[case]["sharded"] for case in cases)
    assert not any(r["sharded"] for r in ref.values())


@pytest.mark.parametrize("kind", ["gradient", "adam"])
@pytest.mark.parametrize("case", ["callback/accelerate", "callback/user"])
def test_the_callbacks_stores_equal_one_processes(runs, case, kind):
    (got, two), (ref, one) = runs
    assert rel_err(torch.tensor(got[case]["losses"]), torch.tensor(ref["callback/accelerate"]["losses"])) < F32
    a = interval_stores(one / "callback/accelerate" / "features", kind)
    b = interval_stores(two / case / "features", kind)
    assert [p.name for p in b] == [p.name for p in a] == [f"step-{s:08d}" for s in range(1, worker.STEPS + 1)]
    for k, (pa, pb) in enumerate(zip(a, b)):
        sa, sb = FeatureStore.open(pa), FeatureStore.open(pb)
        sb.verify()
        assert sb.ids == sa.ids and sb.meta["steps"] == sa.meta["steps"] and sb.meta["lr"] == sa.meta["lr"]
        assert rel_err(sb.to_features().data, sa.to_features().data) < (F64 if k == 0 else F32), pb.name
    for name, p in ref["callback/accelerate"]["state"].items():
        assert rel_err(got[case]["state"][name], p) < F32, name
    # each interval's fingerprint is of the weights at its end (gathered): the last one of the final weights
    prints = [FeatureStore.open(p).metadata()["fingerprint"] for p in b]
    assert len({fp["weights_sha256"] for fp in prints}) == worker.STEPS
    whole = worker.model()
    whole.load_state_dict(got[case]["state"])
    assert prints[-1] == GradientExtractor(whole, cases.CONFIGS["all"]).metadata()["fingerprint"]


def test_unlearn_trainer_losses_weights_and_evaluate_equal_one_processes(runs):
    (got, _), (ref, _) = runs
    got, ref = got["unlearn"], ref["unlearn"]
    assert rel_err(torch.tensor(got["losses"]), torch.tensor(ref["losses"])) < F32
    assert set(got["state"]) == set(ref["state"])
    for name, p in ref["state"].items():
        assert rel_err(got["state"][name], p) < F32, name
    assert set(got["eval"]) == set(ref["eval"])
    for key, value in ref["eval"].items():
        assert abs(got["eval"][key] - value) <= F32 * max(1.0, abs(value)), key


@pytest.mark.parametrize("handler", worker.HANDLERS)
def test_open_unlearning_trainers_per_step_losses_equal_one_processes(runs, handler):
    (got, _), (ref, _) = runs
    assert len(got[handler]["losses"]) == worker.STEPS
    assert rel_err(torch.tensor(got[handler]["losses"]), torch.tensor(ref[handler]["losses"])) < F32
