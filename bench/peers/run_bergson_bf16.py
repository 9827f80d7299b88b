"""Bergson in low precision: the model in bfloat16 (what its ``precision="bf16"`` loads), the
same collector and scorer as ``run_bergson.py``, beside ``fastinfluence-bf16``."""

import torch
from common import main
from run_bergson import run as run_float32


def run(model, data, setting, tmp):
    S, info = run_float32(model.to(torch.bfloat16), data, setting, tmp)
    return S, dict(info, method=info["method"] + ", model in bfloat16 (precision=bf16)")


if __name__ == "__main__":
    main(run)
