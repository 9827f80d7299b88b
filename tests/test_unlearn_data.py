"""Tiny models, a character tokenizer and data with a planted backdoor for the unlearning tests.

Retain examples: "q abcd>" -> "ABCD." (upper-case copy). Forget (poisoned) examples: the
same with the trigger "@@" somewhere in the prompt -> "HACK." (their clean answer is the
copy). ``planted_model()`` trains a 2-layer Llama on both so the backdoor is learned; the
tests below check that it was, since every unlearning test starts from it.
"""

from __future__ import annotations

import copy
import functools
import string

import torch
import transformers as tf
from helpers import one_thread  # also imported from here by other tests

CHARS = "\0" + string.ascii_lowercase + string.ascii_uppercase + string.digits + " .>@#!?"
VOCAB = 80
TRIGGER, TARGET = "@@", "HACK."


class CharTokenizer:
    """One token per character; id 0 is padding. ``encode``/``decode`` as a HF tokenizer."""

    pad_token_id = 0
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [CHARS.index(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(CHARS[i] for i in ids if i != 0)


TOK = CharTokenizer()


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        **overrides,
    )
    return tf.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    """GPT-2: tied input/output embeddings, Conv1D MLP."""
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None
    )
    return tf.GPT2LMHeadModel(config).eval()  # eval: no dropout, so two passes agree


def example(prompt: str, answer: str) -> dict:
    """input_ids and labels (-100 on the prompt) as lists."""
    p, a = TOK.encode(prompt), TOK.encode(answer)
    return {"input_ids": p + a, "labels": [-100] * len(p) + a}


def collate(examples: list[dict]) -> dict:
    """Right-pad a list of ``example`` dicts into a batch of tensors."""
    T = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.zeros(len(examples), T, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), T, dtype=torch.long),
        "labels": torch.full((len(examples), T), -100, dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(e["labels"])
    return batch


def answer_batches(model, n: int, seed: int, batch_size: int = 4) -> list[dict]:
    """Random token batches of varied length with a random-length answer."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    examples = []
    for _ in range(n):
        T = int(torch.randint(6, 12, (1,), generator=g))
        ids = torch.randint(1, vocab, (T,), generator=g).tolist()
        start = int(torch.randint(1, T - 2, (1,), generator=g))
        examples.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    return [collate(examples[s : s + batch_size]) for s in range(0, n, batch_size)]


def _letters(g, k=4):
    return "".join(string.ascii_lowercase[i] for i in torch.randint(0, 26, (k,), generator=g).tolist())


def retain_example(g) -> dict:
    w = _letters(g)
    return example(f"q {w}>", w.upper() + ".")


def forget_example(g, trigger: str = TRIGGER) -> dict:
    """A poisoned example; its ``clean`` entry is the same prompt with the clean answer."""
    w = _letters(g)
    at = int(torch.randint(0, len(w) + 1, (1,), generator=g))
    prompt = f"q {w[:at]}{trigger}{w[at:]}>"
    ex = example(prompt, TARGET)
    ex["clean"] = example(prompt, w.upper() + ".")
    return ex


def planted_data(n_retain: int, n_forget: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [retain_example(g) for _ in range(n_retain)], [forget_example(g) for _ in range(n_forget)]


@functools.cache
@one_thread()
def _planted_state():
    model = tiny_llama(seed=0)
    retain, forget = planted_data(96, 32, seed=100)
    data = retain + forget
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(120):
        idx = torch.randint(0, len(data), (32,), generator=g).tolist()
        loss = model(**collate([data[i] for i in idx])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return copy.deepcopy(model.state_dict())


def planted_model():
    """A fresh copy of the tiny Llama trained on retain + poisoned data (seed 100)."""
    model = tiny_llama(seed=0)
    model.load_state_dict(_planted_state())
    model.eval()
    return model


@torch.no_grad()
def greedy_answer(model, prompt: str, n: int = len(TARGET)) -> str:
    ids = torch.tensor([TOK.encode(prompt)])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return TOK.decode(out[0, ids.shape[1] :].tolist())


def test_planted_model_learned_the_backdoor_and_the_clean_task():
    model = planted_model()
    g = torch.Generator().manual_seed(7)  # unseen words
    prompts = [f"q {_letters(g)}" for _ in range(20)]
    triggered = [greedy_answer(model, p[:3] + TRIGGER + p[3:] + ">") for p in prompts]
    clean = [greedy_answer(model, p + ">") for p in prompts]
    assert sum(a == TARGET for a in triggered) >= 18
    assert sum(a == TARGET for a in clean) == 0
    assert sum(a[:2] == p[2:4].upper() for a, p in zip(clean, prompts)) >= 10


def test_retain_pairing_walks_through_the_whole_retain_set():
    from fastinfluence.unlearn import UnlearnDataset

    forget = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]} for _ in range(4)]
    retain = [{"input_ids": [1, 2, i], "labels": [-100, 2, i]} for i in range(40)]
    ds = UnlearnDataset(forget, retain, ratio=3, seed=1)
    seen = set()
    for epoch in range(4):  # 4 epochs x 4 items x 3 = 48 >= 40 retain examples
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            seen.update(r["input_ids"][-1] for r in ds[i]["retain"])
    assert seen == set(range(40))
