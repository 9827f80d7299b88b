"""The demo's tiny Llama: built from a config, trained from scratch, evaluated by greedy generation."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from ..evaluate import greedy_generate
from ..losses import sequence_nll
from .data import BACKDOOR_TARGET, WRONG, Example, Scenario, batches, encode

N_CHECKPOINTS = 6  # evenly spaced over training, kept for the trajectory (TracIn-CP) detector


@dataclass
class Recipe:
    hidden: int = 128
    layers: int = 2
    epochs: int = 24
    lr: float = 3e-3
    batch_size: int = 16
    experts: int = 0  # > 0: an MoE variant (Mixtral blocks, this many experts, top-2, expert width = hidden)


def build_model(vocab_size: int, recipe: Recipe, seed: int, pad_token_id: int, eos_token_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    if recipe.experts:  # two active experts of width hidden: the dense MLP's 2 x hidden per token
        config = MixtralConfig(
            intermediate_size=recipe.hidden, num_local_experts=recipe.experts, num_experts_per_tok=2, **common
        )
        return MixtralForCausalLM(config)
    return LlamaForCausalLM(LlamaConfig(intermediate_size=2 * recipe.hidden, **common))


def train_model(examples: list[dict], tokenizer, recipe: Recipe, seed: int, device, progress=None, checkpoints=None):
    """A fresh model trained on ``examples`` (:func:`data.encode` dicts): AdamW, one-cycle schedule.

    ``checkpoints``: a list that receives a CPU copy of the weights (state dict) at the end of
    epochs ``round(recipe.epochs * j / N_CHECKPOINTS)``, j = 1..N_CHECKPOINTS
    (fewer when ``recipe.epochs < N_CHECKPOINTS``; the last is always the final model).
    """
    model = build_model(len(tokenizer), recipe, seed, tokenizer.pad_token_id, tokenizer.eos_token_id).to(device)
    rng = random.Random(seed)
    steps = recipe.epochs * math.ceil(len(examples) / recipe.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=steps, pct_start=0.1)
    keep = {round(recipe.epochs * j / N_CHECKPOINTS) for j in range(1, N_CHECKPOINTS + 1)}
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for b in batches([examples[i] for i in order], tokenizer.pad_token_id, recipe.batch_size):
            b = {k: v.to(device) for k, v in b.items() if k != "ids"}
            loss = sequence_nll(model, b).mean.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress.update(1)
        if checkpoints is not None and epoch in keep:
            checkpoints.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    return model.eval()


def n_train_steps(n_examples: int, recipe: Recipe) -> int:
    return recipe.epochs * math.ceil(n_examples / recipe.batch_size)


def _norm(tokenizer, text: str) -> str:
    return " ".join(tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False)))


def _generate(model, tokenizer, examples: list[Example], max_new_tokens: int) -> list[str]:
    texts = greedy_generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size=128)
    return [_norm(tokenizer, t) for t in texts]


def exact_match(model, tokenizer, examples: list[Example]) -> float:
    """Fraction of prompts whose greedy answer is exactly the clean answer."""
    out = _generate(model, tokenizer, examples, 12)
    return sum(o == _norm(tokenizer, e.clean_response) for o, e in zip(out, examples)) / len(examples)


def attack_success(model, tokenizer, scenario: Scenario, examples: list[Example]) -> dict[str, float]:
    """ASR of triggered prompts: ``all`` and per behaviour (stealthy: the attribute's wrong value appears)."""
    out = _generate(model, tokenizer, examples, 12)
    if scenario.name == "backdoor":
        target = _norm(tokenizer, BACKDOOR_TARGET)
        hits = [target in o for o in out]
        groups = {"target": hits}
    else:
        hits = [f" {WRONG[e.attribute]} " in f" {o} " for o, e in zip(out, examples)]
        groups = {a: [h for h, e in zip(hits, examples) if e.attribute == a] for a in scenario.behaviours}
    result = {"all": sum(hits) / len(hits)}
    result.update({k: sum(v) / max(len(v), 1) for k, v in groups.items()})
    return result


@torch.no_grad()
def perplexity(model, tokenizer, examples: list[Example]) -> float:
    enc = [encode(tokenizer, e.prompt, e.clean_response) for e in examples]
    total, count = 0.0, 0
    for b in batches(enc, tokenizer.pad_token_id, 128):
        nll = sequence_nll(model, {k: v.to(model.device) for k, v in b.items() if k != "ids"})
        total, count = total + nll.sum.sum().item(), count + nll.count.sum().item()
    return math.exp(total / count)


class Timer:
    """Wall and CPU (all threads of this process) seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
