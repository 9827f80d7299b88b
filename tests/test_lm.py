"""Position ids: only left padding shifts positions; masked tokens inside a sequence do not."""

import pytest
import torch
from helpers import VOCAB, tiny_model
from test_unlearn_data import one_thread

from fastinfluence import losses
from fastinfluence.lm import model_inputs, position_ids


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_position_ids_subtract_only_the_leading_padding():
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(position_ids(mask), expected)


def _examples(seed: int, last_masked: int = 3):
    """(input_ids, labels, attention_mask) of varied lengths, each with masked tokens inside the
    prompt (an eos used as pad inside a chat template) and a 3-token labelled answer at the end;
    masked positions lie in [1, T - last_masked), so with the default one may predict the answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in (9, 6, 12):
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        mask = torch.ones(T, dtype=torch.long)
        mask[torch.randint(1, T - last_masked, (2,), generator=g)] = 0
        labels = ids.clone()
        labels[: T - 3] = -100
        out.append((ids, labels, mask))
    return out


def _pad(examples, side: str):
    T = max(len(e[0]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, (i, l, m) in enumerate(examples):
        sl = slice(0, len(i)) if side == "right" else slice(T - len(i), T)
        ids[b, sl], labels[b, sl], mask[b, sl] = i, l, m
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _own_nll(model, ids, labels, mask):
    """NLL_sum of one unpadded example from the model's own forward (its default positions)."""
    logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0, :-1].double()
    target = labels[1:]
    keep = target != -100
    return -torch.log_softmax(logits, -1)[keep].gather(1, target[keep, None]).sum()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # absolute and rotary positions
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fused", [True, False])
def test_masked_interior_tokens_keep_the_models_own_nll(arch, side, fused):
    model = tiny_model(arch, torch.float64)
    examples = _examples(seed=3)
    got = losses.sequence_nll(model, _pad(examples, side), fused=fused).sum.double()
    with torch.no_grad():
        own = torch.stack([_own_nll(model, *e) for e in examples])
    assert (got - own).abs().max().item() < 1e-6


def test_model_inputs_passes_positions_and_turns_off_the_cache():
    model = tiny_model("llama", torch.float32)
    batch = _pad(_examples(seed=4), "left")
    kwargs = model_inputs(model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(kwargs["position_ids"], position_ids(batch["attention_mask"]))
    assert kwargs["use_cache"] is False


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_capture_gradients_with_masked_interior_tokens_are_the_models_own(arch):
    """Extraction goes through the same positions: exact gradient inner products of a left-padded
    batch with masked prompt tokens equal those of each example's own forward. (Capture ignores the
    rows of masked tokens, so here none of them predicts an answer token.)"""
    from fastinfluence import exact_scores
    from fastinfluence.capture import select_layers

    model = tiny_model(arch, torch.float64)
    examples = _examples(seed=5, last_masked=4)
    params = [
        p
        for layer in select_layers(model)
        for p in ([layer.module.weight] + ([layer.module.bias] if layer.bias else []))
    ]
    rows = []
    for ids, labels, mask in examples:
        logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0, :-1]
        keep = labels[1:] != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], labels[1:][keep])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    own = torch.stack(rows)
    batch = _pad(examples, "left")
    scores = exact_scores(model, [batch], [batch])
    assert ((scores - own @ own.T).norm() / (own @ own.T).norm()).item() < 1e-10


@pytest.mark.parametrize("side", ["right", "left"])
def test_capture_counts_the_labelled_final_eos_of_eos_padded_batches(side):
    """pad = eos and ``attention_mask = input_ids != pad`` mask the answer's final eos, which is
    still labelled: extraction takes its loss as the model's own forward does."""
    from fastinfluence import exact_scores
    from fastinfluence.capture import select_layers

    model = tiny_model("llama", torch.float64)
    eos = 0
    examples = []
    for ids, labels, mask in _examples(seed=9, last_masked=4):
        ids, labels, mask = ids.clone(), labels.clone(), mask.clone()
        ids[-1], labels[-1], mask[-1] = eos, eos, 0
        examples.append((ids, labels, mask))
    params = [p for layer in select_layers(model) for p in [layer.module.weight]]
    rows = []
    for ids, labels, mask in examples:
        logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0, :-1]
        keep = labels[1:] != -100  # the final eos among them: HF's loss takes it (in float32)
        loss = torch.nn.functional.cross_entropy(logits[keep], labels[1:][keep])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    own = torch.stack(rows)
    batch = _pad(examples, side)
    batch["input_ids"][batch["attention_mask"] == 0] = eos
    scores = exact_scores(model, [batch], [batch])
    assert ((scores - own @ own.T).norm() / (own @ own.T).norm()).item() < 1e-10
