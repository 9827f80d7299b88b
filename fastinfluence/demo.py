"""Built-in demo: find planted near-duplicates by gradient influence, from scratch on a CPU.

A tiny Llama-style model is built from a config, with a word-level tokenizer made here.
It is trained for a few seconds on generated sentences among which a few "planted"
groups of near-duplicate examples hide (a rare fact, repeated with small changes). For
held-out queries that paraphrase each planted fact, the train examples with the highest
influence (cosine of projected per-example gradients) must be that fact's planted copies.

    python -m fastinfluence demo            # or: make demo
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass

import torch

WORDS = (
    "the a one this that some every small large red blue green old new quick slow happy sad "
    "cat dog bird fish horse tree river city house car book song road garden market window "
    "sees likes finds takes gives wants makes keeps holds moves near under over beside behind "
    "and then today yesterday often never always again"
).split()
N_FACTS = 4
FACT_LEN = 12
RARE_PER_FACT = 8  # words that occur only in one planted fact and its copies


@dataclass
class DemoData:
    vocab: list[str]
    train: list[list[str]]
    train_group: list[int]  # planted fact of each train example, -1 for filler
    queries: list[list[str]]
    facts: list[list[str]]


def make_data(n_filler: int, copies: int, rng: random.Random) -> DemoData:
    """Filler sentences of common words, plus ``copies`` near-duplicates of each planted fact.

    A fact is a fixed sequence of rare words (its own) and common words; a near-duplicate
    changes one common word. The queries are one more near-duplicate of each fact.
    """
    rare = [[f"{w}{g}" for w in ("zor", "quin", "vel", "ash", "kes", "obs", "nim", "far")[:RARE_PER_FACT]] for g in range(N_FACTS)]
    facts = []
    for g in range(N_FACTS):
        words = rare[g] + [rng.choice(WORDS) for _ in range(FACT_LEN - RARE_PER_FACT)]
        rng.shuffle(words)
        facts.append(words)

    def filler() -> list[str]:
        return [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]

    def perturb(words: list[str]) -> list[str]:
        words = list(words)
        i = rng.choice([j for j, w in enumerate(words) if w in WORDS])
        words[i] = rng.choice(WORDS)
        return words

    train = [(filler(), -1) for _ in range(n_filler)]
    train += [(perturb(f), g) for g, f in enumerate(facts) for _ in range(copies)]
    rng.shuffle(train)
    vocab = ["<pad>", "<bos>"] + sorted(set(WORDS) | {w for r in rare for w in r})
    return DemoData(vocab, [t for t, _ in train], [g for _, g in train], [perturb(f) for f in facts], facts)


def encode(sentences: list[list[str]], vocab: list[str]) -> list[dict]:
    """One HF-style example per sentence: <bos> + words, every word a label."""
    index = {w: i for i, w in enumerate(vocab)}
    return [{"input_ids": torch.tensor([1] + [index[w] for w in s])} for s in sentences]


def collate(examples: list[dict]) -> dict:
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n], mask[i, :n] = e["input_ids"], 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def build_model(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def train(model, examples: list[dict], steps: int, batch_size: int, seed: int) -> float:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = collate(rng.sample(examples, batch_size))
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def run(
    seed: int = 0,
    steps: int = 80,
    n_filler: int = 200,
    copies: int = 3,
    topk: int = 5,
    rank: int = 32,
    layers: str = "lm_head",
) -> dict:
    """The whole demo; returns a summary dict (``ok`` says whether every planted copy was found)."""
    from . import GradientExtractor, ProjectionConfig, score

    t0 = time.perf_counter()
    data = make_data(n_filler, copies, random.Random(seed))
    train_ex, query_ex = encode(data.train, data.vocab), encode(data.queries, data.vocab)
    model = build_model(len(data.vocab), seed)
    final_loss = train(model, train_ex, steps, 16, seed)
    t_train = time.perf_counter() - t0

    # The LM head by default: classifier-level influence (as IMU uses) separates the
    # planted facts most cleanly; pass layers=".*" for every Linear layer.
    config = ProjectionConfig(rank_in=rank, rank_out=rank, seed=seed, include=[layers])
    extractor = GradientExtractor(model, config)
    batches = [collate(train_ex[s : s + 16]) for s in range(0, len(train_ex), 16)]
    train_feats = extractor.extract(batches)
    query_feats = extractor.extract([collate(query_ex)])
    result = score(query_feats, train_feats, metric="cosine", topk=topk)
    t_total = time.perf_counter() - t0

    print(
        f"trained a {sum(p.numel() for p in model.parameters()):,}-parameter Llama for {steps} steps "
        f"({t_train:.1f}s, final loss {final_loss:.2f}); {copies} near-duplicates of {N_FACTS} facts planted "
        f"among {len(data.train)} examples; features: {train_feats.data.shape[0]} x {train_feats.dim} "
        f"({', '.join(extractor.layout)})"
    )
    found = []
    for q, words in enumerate(data.queries):
        print(f"\nquery {q}: {' '.join(words)}")
        idx = result.topk_indices[q].tolist()
        for rank_, (i, v) in enumerate(zip(idx, result.topk_values[q].tolist())):
            mark = "planted" if data.train_group[i] == q else ""
            print(f"  {rank_ + 1}. {v:+.3f}  [{i:3d}] {' '.join(data.train[i]):<60s} {mark}")
        found.append(all(data.train_group[i] == q for i in idx[:copies]))
    ok = all(found)
    print(f"\nplanted copies ranked first for {sum(found)}/{len(found)} queries: {'OK' if ok else 'FAILED'} "
          f"({t_total:.1f}s in all)")
    return {"ok": ok, "found": found, "seconds": t_total, "final_loss": final_loss}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny model on generated data and find planted near-duplicates by influence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, model and projection (default 0)")
    p.add_argument("--steps", type=int, default=80, help="training steps of the tiny model (default 80)")
    p.add_argument("--filler", type=int, default=200, help="number of ordinary train sentences (default 200)")
    p.add_argument("--copies", type=int, default=3, help="near-duplicates planted per fact (default 3)")
    p.add_argument("--topk", type=int, default=5, help="train examples shown per query (default 5)")
    p.add_argument("--rank", type=int, default=32, help="projection rank k_in = k_out (default 32)")
    p.add_argument("--layers", default="lm_head", help="regex of the layers to capture (default lm_head)")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    p.set_defaults(func=_main)


def _main(args) -> int:
    summary = run(args.seed, args.steps, args.filler, args.copies, args.topk, args.rank, args.layers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["ok"] else 1
