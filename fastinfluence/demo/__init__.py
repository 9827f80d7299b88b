"""The backdoor and stealthy-poison demo: data, tiny model, detection, unlearning, report.

``run`` runs it; ``fastinfluence demo`` (``fastinfluence.cli.demo``) is its command and
describes what it does.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..distributed import resolve_device
from . import detect, unlearn
from .data import SCENARIOS, encode, make_scenario, train_tokenizer
from .model import Recipe, Timer, n_train_steps, train_model


def _bar(total: int, desc: str, on: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=not on)


def _check_out(out: Path) -> None:
    """The output folder is made and a file written in it before any work (an OSError names it)."""
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
        pass


def run_scenario(name: str, seed: int, quick: bool, device: str, log=print, progress: bool = True) -> dict:
    recipe = Recipe(hidden=96, epochs=12) if quick else Recipe()
    scenario = make_scenario(name, seed, n_entities=40 if quick else 60)
    tokenizer = train_tokenizer(scenario)
    enc = [encode(tokenizer, e.prompt, e.response) for e in scenario.train]
    with _bar(n_train_steps(len(enc), recipe), f"{name}: train", progress) as bar, Timer() as t_train:
        checkpoints: list[dict] = []
        model = train_model(enc, tokenizer, recipe, seed, device, bar, checkpoints)
    before = unlearn.metrics(model, tokenizer, scenario)
    log(
        f"[{name}] trained on {len(enc)} examples ({len(scenario.poisoned)} poisoned) in {t_train.wall:.0f}s: "
        f"ASR {before['asr_seen']:.2f}, clean exact match {before['clean_acc']:.2f}, ppl {before['clean_ppl']:.3f}"
    )

    with _bar(detect.N_DETECTORS, f"{name}: detect", progress) as bar:
        found, feats = detect.run(model, tokenizer, scenario, seed, quick, bar, checkpoints)
    default = found[detect.DEFAULT]
    s = unlearn.setup(scenario, tokenizer, default.scores, feats, seed)
    runs = {}
    with _bar(len(unlearn.METHODS), f"{name}: unlearn", progress) as bar:
        for method in unlearn.METHODS:
            bar.set_postfix_str(method)
            runs[method] = unlearn.run(method, model, tokenizer, scenario, s, seed, quick, device)
            bar.update(1)
    with _bar(n_train_steps(len(enc) - len(s.forget), recipe), f"{name}: retrain", progress) as bar:
        again = unlearn.retrain(tokenizer, scenario, s, recipe, seed, device, bar)
    u = runs[unlearn.DEFAULT]
    forget_poisoned = torch.tensor([scenario.train[i].poisoned for i in s.forget])
    wf = s.rapidun_weights[0]
    return {
        "data": {
            "n_train": len(scenario.train),
            "n_poisoned": len(scenario.poisoned),
            "n_reported": len(scenario.reported),
            "behaviours": scenario.behaviours,
            "reported_behaviours": sorted({scenario.train[i].attribute for i in scenario.reported})
            if name == "stealthy"
            else ["target"],
            "n_forget": len(s.forget),
            "n_forget_poisoned": int(forget_poisoned.sum()),
        },
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden": recipe.hidden,
            "layers": recipe.layers,
            "epochs": recipe.epochs,
            "vocab": len(tokenizer),
            "train_seconds": t_train.wall,
            "train_cpu_seconds": t_train.cpu,
        },
        "before": before,
        "detection": {
            k: {
                "auroc": d.auroc,
                "precision_at_k": d.precision_at_k,
                "seconds": d.seconds,
                "cpu_seconds": d.cpu_seconds,
            }
            | ({"auroc_by_behaviour": d.auroc_by_behaviour} if d.auroc_by_behaviour else {})
            for k, d in found.items()
        },
        "default_detector": detect.DEFAULT,
        "weights": {
            "rapidun_forget_true_positive_mean": wf[forget_poisoned].mean().item(),
            "rapidun_forget_false_positive_mean": wf[~forget_poisoned].mean().item()
            if (~forget_poisoned).any()
            else None,
            "seconds": s.seconds,
            "cpu_seconds": s.cpu_seconds,
        },
        "unlearning": runs,
        "default_unlearning": unlearn.DEFAULT,
        "retrain": again,
        "speedup": {
            "unlearn_vs_retrain": again["cpu_seconds"] / u["cpu_seconds"],
            "end_to_end_vs_retrain": again["cpu_seconds"] / (default.cpu_seconds + s.cpu_seconds + u["cpu_seconds"]),
        },
        "_scores": {k: d.scores.tolist() for k, d in found.items()},
        "_poisoned": [e.poisoned for e in scenario.train],
        "_reported": scenario.reported,
    }


def run(
    seed: int = 0,
    scenarios=SCENARIOS,
    quick: bool = False,
    device: str | None = None,
    out: str | Path = "demo_out",
    log=print,
    progress: bool = True,
) -> dict:
    """The whole demo; returns the report (also written to ``out``). ``device`` and ``out`` are
    checked before any work; ``progress=False`` hides the progress bars."""
    from . import report

    device = resolve_device(device)
    _check_out(Path(out))
    if device == "cpu":
        # A tiny model: per-op overhead dominates, and more threads than free cores only spin.
        torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    result = {"seed": seed, "quick": quick, "device": device, "scenarios": {}}
    for name in scenarios:
        result["scenarios"][name] = run_scenario(name, seed, quick, device, log, progress)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    report.write(result, Path(out), log)
    return result
