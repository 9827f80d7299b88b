"""Exact scores the plain way: one backward per example, flattened gradients, dot products.

Independent of every tool under test. Gradients in float32 (relative error ~1e-6, far below
every approximation measured against it), dot products accumulated in float64.
"""

import torch
from common import example_losses, layer_names, main, pad


def grads(model, params, examples):
    for e in examples:
        loss = example_losses(model, pad([e]))[0]
        yield torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def run(model, data, setting, tmp):
    names = set(layer_names(model))
    params = [m.weight for n, m in model.named_modules() if n in names]
    Q = torch.empty(len(data["query"]), sum(p.numel() for p in params), dtype=torch.float64)
    for i, g in enumerate(grads(model, params, data["query"])):
        Q[i] = g
    S = torch.empty(len(data["query"]), len(data["train"]), dtype=torch.float64)
    for j, g in enumerate(grads(model, params, data["train"])):
        S[:, j] = Q @ g
    return S.numpy(), {
        "method": "per-example autograd, float32 gradients, float64 dots",
        "params": sum(p.numel() for p in params),
    }


if __name__ == "__main__":
    main(run)
