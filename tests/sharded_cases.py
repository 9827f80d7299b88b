"""What the FSDP2 tests run, shared by the ranks (``sharded_worker.py``) and the one-process reference."""

from __future__ import annotations

import torch
from helpers import batches_of, collate, make_examples, tiny_model

from fastinfluence import ProjectionConfig

# all:    every Linear, the LM head included (the model's own logits);
# blocks: the decoder blocks only (the fused LM-head loss, inside the head's forward when sharded);
# head:   the LM head alone (its features from one forward, no backward).
CONFIGS = {
    "all": ProjectionConfig(rank_in=4, rank_out=4, dtype="float64"),
    "blocks": ProjectionConfig(rank_in=4, rank_out=4, dtype="float64", include=[r"layers\.\d+\."]),
    "head": ProjectionConfig(rank_in=4, rank_out=4, dtype="float64", include=["lm_head"]),
}
WEIGHTS = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)  # signed example weights of the unlearning loss


def model():
    return tiny_model("llama", torch.float64)


def own_batches(rank: int) -> list[dict]:
    """Rank ``rank``'s own examples: rank + 2 batches (ranks hold different numbers of batches)."""
    return batches_of(make_examples(3 * (rank + 2), seed=10 + rank), 3)


def shared_batches() -> list[dict]:
    """The same batches on every rank: 7 batches of 2 (uneven over the ranks), with ids."""
    examples = make_examples(14, seed=3)
    return [collate(examples[s : s + 2], ids=range(s, s + 2)) for s in range(0, 14, 2)]


def query_batches() -> list[dict]:
    return batches_of(make_examples(3, seed=7), 2)


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer whose second moments ``Normalizer.from_optimizer`` reads (a step on the weighted NLL)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
