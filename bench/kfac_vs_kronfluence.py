"""Full-dimension EK-FAC: fastinfluence.kfac_scores against Kronfluence's EK-FAC, same model, data, layers.

    python bench/kfac_vs_kronfluence.py [--train 512] [--query 64] [--reps 1] [--parallel] [--out FILE]
                                        [--kronfluence-python PYTHON]

The peer benchmark setting (bench/peers/common.py): tiny Llama (hidden 256, 4 layers, vocab 512),
fixed-length random tokens (512 train + 64 query sequences of 64 tokens), every attention and MLP
Linear layer. Each tool runs in its own process and virtualenv (ours in .venv, Kronfluence in
.peers/kronfluence of this checkout, which ``make bench-peers`` creates; --kronfluence-python or
KRONFLUENCE_PYTHON names another interpreter), one thread each, niced;
with --reps > 1 the runs are interleaved with the order rotated; --parallel runs the two tools of
a repetition at the same time (process CPU time is the measure either way). Both score matrices
are saved in a temporary directory; the record goes to bench/results/kfac_vs_kronfluence_cpu.json.

Conventions matched (both float32 model, float64 eigendecompositions):
- loss: per example, mean cross-entropy over its answer tokens (every token after the first),
  summed over the batch; empirical Fisher (true labels: Kronfluence ``use_empirical_fisher=True``);
- EK-FAC on the same tracked modules, eigenvalues refitted in the eigenbasis of C_A and C_G;
- damping 0.1 x mean of each layer's corrected eigenvalues (ours ``damping_ratio=0.1``,
  Kronfluence ``ScoreArguments(damping_factor=None)``, its heuristic; its default is 1e-8);
- no query low-rank approximation, no AMP, batches of 32, no shuffling, all examples fitted.
C_G is normalised per token in Kronfluence and per example in ours: a scalar per layer that
the eigenvalue refit removes, so EK-FAC scores do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
from common import LAYER_SUFFIXES, MODEL, build_model, example_losses, fixed_tokens, load_model, pad  # noqa: E402

# the virtualenv bench/peers/setup.sh makes (PEERS_DIR as there and in bench/peers/run_all.py)
KRON_PY = os.environ.get(
    "KRONFLUENCE_PYTHON", str(Path(os.environ.get("PEERS_DIR", ROOT / ".peers")) / "kronfluence/bin/python")
)
OURS_PY = ROOT / ".venv/bin/python"
BATCH = 32
INCLUDE = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    return {"wall_s": time.perf_counter() - t[0], "cpu_s": time.process_time() - t[1]}


def run_ours(model, data):
    import fastinfluence as fi

    config = fi.ProjectionConfig(include=INCLUDE)
    train = [pad(data["train"][i : i + BATCH]) for i in range(0, len(data["train"]), BATCH)]
    query = [pad(data["query"][i : i + BATCH]) for i in range(0, len(data["query"]), BATCH)]
    t = _clock()
    factors = fi.fit_kfac(model, train, method="ekfac", config=config, damping_ratio=0.1)
    fit = _since(t)
    t = _clock()
    S = fi.kfac_scores(model, query, train, factors=factors, config=config, metric="dot")
    score = _since(t)
    return S.double().numpy(), {"fit": fit, "score": score, "version": fi.__version__}


def run_kronfluence(model, data):
    import logging

    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class LMTask(Task):
        def __init__(self, modules):
            super().__init__()
            self.modules = modules

        def compute_train_loss(self, batch, model, sample=False):
            assert not sample, "empirical Fisher: labels are never sampled"
            return example_losses(model, batch).sum()

        def compute_measurement(self, batch, model):
            return example_losses(model, batch).sum()

        def get_influence_tracked_modules(self):
            return self.modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LAYER_SUFFIXES)]
    task = LMTask(modules)
    model = prepare_model(model, task)
    analyzer = Analyzer("bench", model, task, cpu=True, output_dir=tempfile.mkdtemp(), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad))
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        amp_dtype=None,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=torch.float32,
        gradient_covariance_dtype=torch.float32,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float32,
        lambda_dtype=torch.float32,
    )
    score_args = ScoreArguments(
        damping_factor=None,
        amp_dtype=None,
        query_gradient_low_rank=None,
        per_sample_gradient_dtype=torch.float32,
        precondition_dtype=torch.float32,
        score_dtype=torch.float32,
    )
    t = _clock()
    analyzer.fit_all_factors("ekfac", data["train"], per_device_batch_size=BATCH, factor_args=factor_args)
    fit = _since(t)
    t = _clock()
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        data["query"],
        data["train"],
        per_device_query_batch_size=BATCH,
        per_device_train_batch_size=BATCH,
        score_args=score_args,
    )
    S = analyzer.load_pairwise_scores("scores")["all_modules"]
    score = _since(t)
    notes = {"fit": fit, "score": score, "version": kronfluence.__version__}
    notes["factor_args"] = {k: str(v) for k, v in factor_args.to_str_dict().items()}
    notes["score_args"] = {k: str(v) for k, v in score_args.to_str_dict().items()}
    return S.double().numpy(), notes


def worker(tool: str, work: Path, out: Path) -> None:
    torch.set_num_threads(1)
    data = torch.load(work / "data.pt")
    model = load_model(work)
    t = _clock()
    S, notes = (run_ours if tool == "ours" else run_kronfluence)(model, data)
    record = {"tool": tool, **_since(t), "threads": torch.get_num_threads(), "torch": torch.__version__, **notes}
    np.save(out / f"{tool}.npy", S)
    (out / f"{tool}.json").write_text(json.dumps(record, indent=1))


def spearman_per_query(S: np.ndarray, R: np.ndarray) -> np.ndarray:
    def ranks(x):
        return np.argsort(np.argsort(x, axis=1), axis=1).astype(np.float64)

    a, b = ranks(S), ranks(R)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def compare(S: np.ndarray, R: np.ndarray) -> dict:
    rho = spearman_per_query(S, R)
    pear = [np.corrcoef(s, r)[0, 1] for s, r in zip(S, R)]
    top1 = float(np.mean(S.argmax(1) == R.argmax(1)))
    return {
        "spearman_mean": float(rho.mean()),
        "spearman_min": float(rho.min()),
        "pearson_mean": float(np.mean(pear)),
        "rel_err": float(np.linalg.norm(S - R) / np.linalg.norm(R)),
        "scale_ours_over_kronfluence": float((S * R).sum() / (R * R).sum()),
        "top1_agreement": top1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--query", type=int, default=64)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--parallel", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench/results/kfac_vs_kronfluence_cpu.json"))
    p.add_argument(
        "--kronfluence-python",
        default=KRON_PY,
        help="Kronfluence's interpreter (default $KRONFLUENCE_PYTHON, else .peers/kronfluence/bin/python in this "
        "checkout, which `make bench-peers` creates)",
    )
    args = p.parse_args()
    if not Path(args.kronfluence_python).exists():
        raise SystemExit(
            f"no Kronfluence interpreter at {args.kronfluence_python}: `make bench-peers` creates it "
            "(or give --kronfluence-python)"
        )
    if not (0 < args.train <= 512 and 0 < args.query <= 64):
        raise SystemExit(f"--train must be in 1..512 and --query in 1..64, got {args.train} and {args.query}")

    tmp = Path(tempfile.mkdtemp(prefix="kfac_vs_kron_"))
    work = tmp / "work"
    work.mkdir()
    build_model(0).save_pretrained(work / "model")
    V = MODEL["vocab_size"]  # the peers' fixed-length sets, or their first examples
    data = {"train": fixed_tokens(512, 64, V, 1)[: args.train], "query": fixed_tokens(64, 64, V, 2)[: args.query]}
    torch.save(data, work / "data.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pythons = {"ours": OURS_PY, "kronfluence": args.kronfluence_python}
    reps = []
    for r in range(args.reps):
        order = ["ours", "kronfluence"] if r % 2 == 0 else ["kronfluence", "ours"]
        out = tmp / f"rep{r}"
        out.mkdir()
        cmds = {t: ["nice", "-n", "10", str(pythons[t]), __file__, "--worker", t, str(work), str(out)] for t in order}
        if args.parallel:
            procs = [subprocess.Popen(cmds[t], env=env) for t in order]
            codes = [pr.wait() for pr in procs]
        else:
            codes = [subprocess.run(cmds[t], env=env).returncode for t in order]
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {dict(zip(order, codes))}); see its output above")
        recs = {t: json.loads((out / f"{t}.json").read_text()) for t in order}
        S, R = np.load(out / "ours.npy"), np.load(out / "kronfluence.npy")
        reps.append({"order": order, "runs": recs, "agreement": compare(S, R), "scores_dir": str(out)})
        print(json.dumps(reps[-1]["agreement"]), {t: round(recs[t]["cpu_s"], 1) for t in order}, flush=True)
        write(args, reps)  # after every repetition, so a cut-short run keeps what it measured


def write(args, reps: list[dict]) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    med = lambda t, k: float(np.median([rep["runs"][t][k] for rep in reps]))  # noqa: E731
    result = {
        "bench": "kfac_vs_kronfluence",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)",
        "commit": commit,
        "python": platform.python_version(),
        "versions": {
            "fastinfluence": reps[0]["runs"]["ours"]["version"],
            "kronfluence": reps[0]["runs"]["kronfluence"]["version"],
            "torch_ours": reps[0]["runs"]["ours"]["torch"],
            "torch_kronfluence": reps[0]["runs"]["kronfluence"]["torch"],
        },
        "settings": {
            "model": MODEL,
            "data": "fixed-length random tokens, seq 64 (bench/peers/common.py)",
            "train": args.train,
            "query": args.query,
            "batch": BATCH,
            "layers": list(LAYER_SUFFIXES),
            "threads": 1,
            "nice": 10,
            "reps": len(reps),
            "parallel": args.parallel,
            "dtype": "float32 model and gradients, float64 eigendecomposition (both)",
            "loss": "per example mean answer-token cross-entropy, summed over the batch",
            "fisher": "empirical (true labels)",
            "damping": "0.1 x mean corrected eigenvalue per layer",
            "ours": "fit_kfac(method='ekfac', damping_ratio=0.1) + kfac_scores(factors=..., metric='dot')",
            "kronfluence": "Analyzer.fit_all_factors(strategy='ekfac', use_empirical_fisher=True) + "
            "compute_pairwise_scores(damping_factor=None, query_gradient_low_rank=None)",
        },
        "cpu_s": {t: med(t, "cpu_s") for t in ("ours", "kronfluence")},
        "wall_s": {t: med(t, "wall_s") for t in ("ours", "kronfluence")},
        "agreement": reps[-1]["agreement"],
        "reps": reps,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
