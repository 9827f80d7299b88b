"""Kronfluence in low precision: the ``identity`` strategy with its own presets
``all_low_precision_factor_arguments`` / ``all_low_precision_score_arguments`` (bfloat16 autocast,
per-sample gradients and scores in bfloat16): the setting its documentation gives for speed and
memory, beside ``fastinfluence-bf16``'s exact scores."""

import torch
from common import main
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments
from run_kronfluence import pairwise_scores


def run(model, data, setting, tmp):
    factor_args = all_low_precision_factor_arguments(strategy="identity", dtype=torch.bfloat16)
    S = pairwise_scores(model, data, factor_args, all_low_precision_score_arguments(dtype=torch.bfloat16))
    return S, {"method": "Analyzer, strategy=identity, all_low_precision_{factor,score}_arguments(bfloat16)"}


if __name__ == "__main__":
    main(run)
