"""Kronfluence: ``Analyzer`` with the ``identity`` strategy (no Hessian: exact gradient inner
products), pairwise scores at its defaults, batches padded to their own longest example."""

import logging
import tempfile

import torch
from common import LAYER_SUFFIXES, example_losses, main, pad
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs

BATCH = 32


class LMTask(Task):
    def __init__(self, modules):
        super().__init__()
        self.modules = modules

    def compute_train_loss(self, batch, model, sample=False):
        if not sample:
            return example_losses(model, batch).sum()
        with torch.no_grad():  # the true Fisher samples labels from the model; unused by the identity strategy
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
        labels = torch.distributions.Categorical(logits=logits).sample()
        labels = torch.where(batch["labels"] == -100, -100, torch.roll(labels, 1, 1))
        return example_losses(model, {**batch, "labels": labels}).sum()

    def compute_measurement(self, batch, model):
        return example_losses(model, batch).sum()

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def pairwise_scores(model, data, factor_args: FactorArguments, score_args: ScoreArguments):
    """(Q, N) identity-strategy scores of the query set against the train set, as float64 numpy."""
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LAYER_SUFFIXES)]
    task = LMTask(modules)
    model = prepare_model(model, task)
    analyzer = Analyzer("bench", model, task, cpu=True, output_dir=tempfile.mkdtemp(), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad))
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    analyzer.fit_all_factors("identity", data["train"], per_device_batch_size=BATCH, factor_args=factor_args)
    analyzer.compute_pairwise_scores(
        "scores",
        "identity",
        data["query"],
        data["train"],
        per_device_query_batch_size=BATCH,
        per_device_train_batch_size=BATCH,
        score_args=score_args,
    )
    return analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()


def run(model, data, setting, tmp):
    S = pairwise_scores(model, data, FactorArguments(strategy="identity"), ScoreArguments())
    return S, {"method": "Analyzer, strategy=identity, pairwise scores, default ScoreArguments"}


if __name__ == "__main__":
    main(run)
