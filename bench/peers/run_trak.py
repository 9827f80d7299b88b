"""TRAK (traker): cost probe of its CPU path.

TRAK projects each example's full flattened gradient (here D = 2.6M weights) with a dense
random matrix; its fast projector (fast_jl) is CUDA-only, so on a CPU it uses
``BasicProjector``, which regenerates the D x k matrix block by block for every batch. This
probe times that projection alone for one batch of 32 at TRAK's default k = 2048, so the
cost of a full run (train + query batches) can be stated without spending it. The
projection's cost is linear in D (each of D rows of the matrix is generated and multiplied
once), so it is timed on a 1/16 slice of the gradient and scaled by 16.
"""

import time

import torch
from common import LAYER_SUFFIXES, load_model
from trak.projectors import BasicProjector, ProjectionType

if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    model = load_model(work)
    D = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(LAYER_SUFFIXES))
    slice_ = 16
    proj = BasicProjector(
        grad_dim=D // slice_, proj_dim=2048, seed=0, proj_type=ProjectionType.rademacher, device="cpu"
    )
    grads = torch.randn(32, D // slice_)
    t0 = time.process_time()
    proj.project(grads, model_id=0)
    per_batch = (time.process_time() - t0) * slice_
    out.write_text(
        json.dumps(
            {
                "grad_dim": D,
                "proj_dim": 2048,
                "batch": 32,
                "cpu_s_per_batch": per_batch,
                "timed_on": f"1/{slice_} of the gradient, scaled",
            }
        )
    )
