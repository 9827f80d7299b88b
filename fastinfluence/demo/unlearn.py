"""Unlearning from the detected forget set with every method, and retraining without it."""

from __future__ import annotations

import copy
import random
import tempfile
import warnings
from dataclasses import dataclass

import torch

from .. import score
from ..evaluate import auc
from ..losses import sequence_nll
from ..unlearn import UnlearnDataset, UnlearnTrainer
from ..weights import UnlearnWeights, imu, low_influence, rapidun
from .data import Scenario, batches, encode
from .model import Recipe, Timer, attack_success, exact_match, perplexity, train_model

# name: (UnlearnTrainer method, weights, rapidun_tokens, subset); weights: None, "rapidun" or "imu";
# subset: None, "low_influence" (drop the forget examples of lowest influence) or "random" (its control).
METHODS = {
    "ga": ("ga", None, "all", None),
    "graddiff": ("graddiff", None, "all", None),
    "npo": ("npo", None, "all", None),
    "simnpo": ("simnpo", None, "all", None),
    "rapidun": ("rapidun", None, "all", None),
    "rapidun_weighted": ("rapidun", "rapidun", "all", None),
    "rapidun_differing": ("rapidun", None, "differing", None),
    "graddiff_imu": ("graddiff", "imu", "all", None),
    "skip_low_influence": (None, None, None, "low_influence"),
    "skip_random": (None, None, None, "random"),
}
# The full-answer RapidUn loss: with the first-MLP detector's forget sets it removes every behaviour
# (ASR 0.00, seeds 0 and 1, both scenarios) and keeps more clean accuracy than the differing-token
# variant (stealthy 0.99 / 0.93 vs 0.97 / 0.77; backdoor equal), so the variant is not the default.
DEFAULT = "rapidun"
SKIP_QUANTILE = 0.5


@dataclass
class Setup:
    """What every unlearning run shares."""

    forget: list[int]  # train indices: the reports + the detector's top-k
    retain: list[int]  # train indices: a sample of the rest
    forget_examples: list[dict]
    retain_examples: list[dict]
    rapidun_weights: tuple[torch.Tensor, torch.Tensor]
    imu_weights: torch.Tensor
    influence: torch.Tensor  # (Nf,) mean cosine of each forget example with the reports
    seconds: float  # to compute the weights
    cpu_seconds: float


def forget_set(scenario: Scenario, scores: torch.Tensor) -> list[int]:
    """The reports plus the top-k other train examples, k = number of poisoned among them."""
    reported = set(scenario.reported)
    k = len(scenario.poisoned) - len(reported & set(scenario.poisoned))
    order = [i for i in torch.argsort(scores, descending=True, stable=True).tolist() if i not in reported]
    return sorted(reported | set(order[:k]))


def setup(scenario: Scenario, tokenizer, scores: torch.Tensor, feats: dict, seed: int, ratio: int = 3) -> Setup:
    """Forget and retain sets, RapidUn weights (cosine, FF FR RF RR) and IMU weights (LM-head features)."""
    with Timer() as t:
        forget = forget_set(scenario, scores)
        rest = sorted(set(range(len(scenario.train))) - set(forget))
        retain = sorted(random.Random(seed).sample(rest, min(len(rest), ratio * len(forget))))
        tr, q, ext, train_batches = feats["attn_mlp"]
        retain_q = random.Random(seed + 1).sample(retain, min(32, len(retain)))
        enc = [encode(tokenizer, e.prompt, e.response) for e in scenario.train]
        rq = ext.extract(batches([enc[i] for i in retain_q], tokenizer.pad_token_id, 64, ids=retain_q))
        with tempfile.TemporaryDirectory() as d:
            # Full (Q, N) cosine matrices, memory-mapped, as a user with a large store would get them.
            Sf = score(q, tr, metric="cosine", topk=1, matrix_path=f"{d}/f.npy").matrix
            Sr = score(rq, tr, metric="cosine", topk=1, matrix_path=f"{d}/r.npy").matrix
            w = rapidun(Sf[:, forget], Sr[:, forget], Sf[:, retain], Sr[:, retain], rows="queries")
            influence = torch.as_tensor(Sf[:, forget]).double().mean(0)
        imu_w = imu(feats["lm_head"][forget]).weights
    fe = [
        encode(tokenizer, scenario.train[i].prompt, scenario.train[i].response)
        | {"clean": encode(tokenizer, scenario.train[i].prompt, scenario.train[i].clean_response)}
        for i in forget
    ]
    re = [enc[i] for i in retain]
    return Setup(forget, retain, fe, re, (w.forget, w.retain), imu_w, influence, t.wall, t.cpu)


@torch.no_grad()
def mia_auc(model, tokenizer, scenario: Scenario) -> float:
    """Loss-based membership AUC: poisoned train examples (members) vs poisoned ones never trained on."""

    def scores(examples):
        enc = [encode(tokenizer, e.prompt, e.response) for e in examples]
        return torch.cat(
            [
                -sequence_nll(model, {k: v.to(model.device) for k, v in b.items() if k != "ids"}).mean.cpu()
                for b in batches(enc, tokenizer.pad_token_id, 128)
            ]
        )

    return auc(scores([scenario.train[i] for i in scenario.poisoned]), scores(scenario.mia_holdout))


def metrics(model, tokenizer, scenario: Scenario) -> dict:
    seen = attack_success(model, tokenizer, scenario, scenario.attack_seen)
    shift = attack_success(model, tokenizer, scenario, scenario.attack_shift)
    return {
        "asr_seen": seen["all"],
        "asr_seen_by_behaviour": {k: v for k, v in seen.items() if k != "all"},
        "asr_shift": shift["all"],
        "clean_acc": exact_match(model, tokenizer, scenario.clean_eval),
        "clean_acc_shift": exact_match(model, tokenizer, scenario.shift_eval),
        "clean_ppl": perplexity(model, tokenizer, scenario.clean_eval),
        "mia_auc": mia_auc(model, tokenizer, scenario),
    }


# Learning rate per scenario. In ``stealthy`` the poisoned and clean answers share every token but the
# value, so the differing-token forget loss acts on one token per example and needs a larger step to
# reach the behaviours the forget set misses (set for it, and kept for every method of the scenario);
# ``backdoor`` answers differ in every token, and 5e-4 there costs clean accuracy (0.88) for no ASR gain
# (0.00 at both rates, seed 0).
LR = {"backdoor": 2e-4, "stealthy": 5e-4}
EPOCHS, BATCH = 4, 16


def dataset(
    forget: list[dict], retain: list[dict], weights: UnlearnWeights, seed: int, ratio: int = 3
) -> tuple[UnlearnDataset, list[int]]:
    """The unlearning data of a hand-off as the CLI's ``unlearn`` builds it, and the kept forget
    indices: the skipped forget examples are dropped, the kept ones carry their weights."""
    keep, w_f, w_r = weights.select(len(forget), len(retain))
    data = UnlearnDataset(
        [forget[i] for i in keep], retain, ratio=ratio, forget_weights=w_f, retain_weights=w_r, seed=seed
    )
    return data, keep


def run(
    name: str,
    model,
    tokenizer,
    scenario: Scenario,
    s: Setup,
    seed: int,
    quick: bool,
    device: str,
    default: str = DEFAULT,
    lr: float | None = None,
    epochs: int = EPOCHS,
    batch_size: int = BATCH,
) -> dict:
    """One unlearning run on a copy of ``model``: its metrics, time and forget-set size
    (``lr`` None: the scenario's rate, :data:`LR`)."""
    from transformers import PrinterCallback, TrainingArguments

    lr = LR[scenario.name] if lr is None else lr
    method, weights, tokens, subset = METHODS[name]
    keep: list[int] | torch.Tensor | None = None
    if subset is not None:
        method, weights, tokens, _ = METHODS[default]
        low = low_influence(s.influence, quantile=SKIP_QUANTILE)
        every = list(range(len(s.forget)))
        keep = low.keep if subset == "low_influence" else sorted(random.Random(seed).sample(every, len(low.keep)))
    w_f = w_r = None
    if weights == "rapidun":
        w_f, w_r = s.rapidun_weights
    elif weights == "imu":
        w_f = s.imu_weights
    handoff = UnlearnWeights(w_f, w_r, None if keep is None else torch.as_tensor(keep), len(s.forget))
    data, keep = dataset(s.forget_examples, s.retain_examples, handoff, seed)
    unlearned = copy.deepcopy(model).train()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(
            output_dir=out,
            use_cpu=device == "cpu",
            report_to=[],
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=seed,
            weight_decay=0.0,
        )
        trainer = UnlearnTrainer(
            model=unlearned, args=args, method=method, train_dataset=data, rapidun_tokens=tokens or "all"
        )
        trainer.remove_callback(PrinterCallback)
        with Timer() as t:
            trainer.train()
    unlearned.eval()
    return metrics(unlearned, tokenizer, scenario) | {
        "seconds": t.wall,
        "cpu_seconds": t.cpu,
        "n_forget": len(keep),
        "lr": lr,
        "n_forget_poisoned": sum(scenario.train[s.forget[i]].poisoned for i in keep),
    }


def retrain(tokenizer, scenario: Scenario, s: Setup, recipe: Recipe, seed: int, device, progress=None) -> dict:
    """The same training recipe from scratch on the train set without the forget set."""
    drop = set(s.forget)
    enc = [encode(tokenizer, e.prompt, e.response) for i, e in enumerate(scenario.train) if i not in drop]
    with Timer() as t:
        model = train_model(enc, tokenizer, recipe, seed, device, progress)
    return metrics(model, tokenizer, scenario) | {"seconds": t.wall, "cpu_seconds": t.cpu}
