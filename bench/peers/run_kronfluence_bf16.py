"""Kronfluence in low precision: the ``identity`` strategy with its own presets
``all_low_precision_factor_arguments`` / ``all_low_precision_score_arguments`` (bfloat16 autocast,
per-sample gradients and scores in bfloat16): the setting its documentation gives for speed and
memory, beside ``fastinfluence-bf16``'s exact scores."""

import logging
import tempfile

import torch
from common import LAYER_SUFFIXES, main, pad
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments
from kronfluence.utils.dataset import DataLoaderKwargs
from run_kronfluence import BATCH, LMTask


def run(model, data, setting, tmp):
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LAYER_SUFFIXES)]
    task = LMTask(modules)
    model = prepare_model(model, task)
    analyzer = Analyzer("bench", model, task, cpu=True, output_dir=tempfile.mkdtemp(), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad))
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    factor_args = all_low_precision_factor_arguments(strategy="identity", dtype=torch.bfloat16)
    analyzer.fit_all_factors("identity", data["train"], per_device_batch_size=BATCH, factor_args=factor_args)
    analyzer.compute_pairwise_scores(
        "scores",
        "identity",
        data["query"],
        data["train"],
        per_device_query_batch_size=BATCH,
        per_device_train_batch_size=BATCH,
        score_args=all_low_precision_score_arguments(dtype=torch.bfloat16),
    )
    S = analyzer.load_pairwise_scores("scores")["all_modules"]
    return S.double().numpy(), {
        "method": "Analyzer, strategy=identity, all_low_precision_{factor,score}_arguments(bfloat16)"
    }


if __name__ == "__main__":
    main(run)
