"""Exact scores the plain way: one backward per example, flattened gradients, dot products.

Independent of every tool under test. Gradients in float32 (relative error ~1e-6, far below
every approximation measured against it), dot products accumulated in float64. Under a ``head*``
setting the LM head's weight is included; a tied head is first untied into a copy of the same
values, so its gradient is the head's share of the tied weight's gradient (the head module's own).
"""

import torch
from common import captures_head, example_losses, layer_names, main, pad


def grads(model, params, examples):
    for e in examples:
        loss = example_losses(model, pad([e]))[0]
        yield torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def run(model, data, setting, tmp):
    head = captures_head(setting)
    if head and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    names = set(layer_names(model, head=head))
    params = [m.weight for n, m in model.named_modules() if n in names]
    Q = torch.empty(len(data["query"]), sum(p.numel() for p in params), dtype=torch.float64)
    for i, g in enumerate(grads(model, params, data["query"])):
        Q[i] = g
    S = torch.empty(len(data["query"]), len(data["train"]), dtype=torch.float64)
    for j, g in enumerate(grads(model, params, data["train"])):
        S[:, j] = Q @ g
    return S.numpy(), {
        "method": "per-example autograd, float32 gradients, float64 dots" + (", LM head included" if head else ""),
        "params": sum(p.numel() for p in params),
    }


if __name__ == "__main__":
    main(run)
