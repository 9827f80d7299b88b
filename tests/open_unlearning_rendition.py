"""A faithful local rendition of open-unlearning's trainer base classes and unlearning data pipeline.

open-unlearning is not on the package index, so the integration is tested against this copy of
its contract, written from its source (src/trainer/base.py, src/trainer/unlearn/base.py,
src/trainer/utils.py, src/trainer/unlearn/{grad_diff,npo,simnpo}.py, src/data/{unlearn,collators}.py):

- ``FinetuneTrainer(evaluators=None, template_args=None, *args, **kwargs)`` over HF ``Trainer``;
  ``UnlearnTrainer(FinetuneTrainer)`` adds ``_prepare_deepspeed``; trainers are built by
  ``load_trainer`` with every argument by keyword plus ``**method_args``. Its newer base class
  (PR #175, ``DispatchingUnlearnTrainer`` here) dispatches ``compute_loss`` between
  ``compute_unlearn_loss`` (unlearning batches) and the HF loss (an ``eval_dataset``).
- ``ForgetRetainDataset(forget, retain, anchor="forget")``: item ``{"forget": f[idx], "retain": r[random]}``.
- ``DataCollatorForSupervisedDataset(tokenizer, padding_side="right", index=None)``: recurses into
  nested dicts, pads input_ids with the pad token (= eos) and labels with -100,
  ``attention_mask = input_ids != pad``, and adds ``index`` when ``index="index"``.
- the losses, as its trainers compute them (``outputs.loss``, ``compute_batch_nll``,
  ``compute_dpo_loss``, ``compute_kl_divergence``).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers import Trainer

PAD = EOS = 0


class FinetuneTrainer(Trainer):
    def __init__(self, evaluators=None, template_args=None, *args, **kwargs):
        self.evaluators = evaluators
        self.template_args = template_args
        super().__init__(*args, **kwargs)


class UnlearnTrainer(FinetuneTrainer):
    def _prepare_deepspeed(self, model):
        raise AssertionError("deepspeed is not enabled in these tests")


class DispatchingUnlearnTrainer(UnlearnTrainer):
    """The base class after open-unlearning's PR #175: ``compute_loss`` sends unlearning batches to the
    method's ``compute_unlearn_loss`` and any other batch (an HF ``eval_dataset``) to the HF loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "forget" in inputs:
            return self.compute_unlearn_loss(model, inputs, return_outputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def compute_unlearn_loss(self, model, inputs, return_outputs=False):
        raise NotImplementedError


class ForgetRetainDataset(torch.utils.data.Dataset):
    def __init__(self, forget, retain, anchor="forget"):
        self.forget, self.retain, self.anchor = forget, retain, anchor

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, idx):
        item = {"forget": self.forget[idx]}
        if self.retain:
            item["retain"] = self.retain[torch.randint(0, len(self.retain), (1,)).item()]
        return item


class DataCollatorForSupervisedDataset:
    def __init__(self, tokenizer, padding_side="right", index=None):
        self.tokenizer, self.padding_side, self.index = tokenizer, padding_side, index

    def _pad(self, seqs, value):
        if self.padding_side == "right":
            return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)
        flipped = [torch.flip(s, dims=[0]) for s in seqs]
        return torch.nn.utils.rnn.pad_sequence(flipped, batch_first=True, padding_value=value).flip(dims=[1])

    def __call__(self, instances):
        if "input_ids" not in instances[0]:
            return {key: self([inst[key] for inst in instances]) for key in instances[0]}
        input_ids = self._pad([inst["input_ids"] for inst in instances], self.tokenizer.pad_token_id)
        out = {"input_ids": input_ids, "attention_mask": input_ids.ne(self.tokenizer.pad_token_id)}
        if "labels" in instances[0]:
            out["labels"] = self._pad([inst["labels"] for inst in instances], -100)
        if self.index:
            out[self.index] = torch.tensor([inst[self.index] for inst in instances])
        return out


def collator(index: bool = True) -> DataCollatorForSupervisedDataset:
    return DataCollatorForSupervisedDataset(types.SimpleNamespace(pad_token_id=PAD), index="index" if index else None)


def qa_items(n: int, seed: int, vocab: int, alternate: bool = False) -> list[dict]:
    """QADataset items: a chat-like prompt with an eos inside it, an answer ending in eos, ``index``."""
    g = torch.Generator().manual_seed(seed)

    def sample(prompt, index):
        answer = torch.randint(1, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        ids = torch.cat([prompt, answer, torch.tensor([EOS])])
        labels = torch.cat([torch.full_like(prompt, -100), answer, torch.tensor([EOS])])
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "index": index}

    items = []
    for i in range(n):
        prompt = torch.randint(1, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        prompt[int(torch.randint(1, len(prompt), (1,), generator=g))] = EOS
        item = sample(prompt, i)
        items.append({"original": item, "alternate": sample(prompt, -1)} if alternate else item)
    return items


def model_batch(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def batch_nll(model, batch):
    """compute_batch_nll: per-sequence NLL sums from the model's own logits."""
    logits = model(**model_batch(batch)).logits[..., :-1, :]
    loss = F.cross_entropy(logits.transpose(-1, -2), batch["labels"][..., 1:], ignore_index=-100, reduction="none")
    return loss.sum(-1)


def retain_loss(model, ref_model, batch, kind):
    if kind == "NLL":
        return model(**model_batch(batch)).loss
    with torch.no_grad():
        ref = F.log_softmax(ref_model(**model_batch(batch)).logits, -1)
    cur = F.log_softmax(model(**model_batch(batch)).logits, -1)
    V = cur.shape[-1]
    return F.kl_div(cur.view(-1, V), ref.view(-1, V), reduction="batchmean", log_target=True)


def loss(method, model, ref_model, inputs, gamma=1.0, alpha=1.0, beta=1.0, delta=0.0, retain_loss_type="NLL"):
    """open-unlearning's loss of GradAscent, GradDiff, NPO and SimNPO on one batch."""
    f = inputs["forget"]
    if method == "GradAscent":
        return -model(**model_batch(f)).loss
    if method == "GradDiff":
        forget = -model(**model_batch(f)).loss
    elif method == "NPO":
        with torch.no_grad():
            ref = batch_nll(ref_model, f)
        lose_log_ratio = -(batch_nll(model, f) - ref)
        forget = -2 / beta * F.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()
    elif method == "SimNPO":
        x = batch_nll(model, f) / (f["labels"] != -100).sum(-1) - delta
        forget = -F.logsigmoid(beta * x).mean() * 2 / beta
    else:
        raise AssertionError(method)
    return gamma * forget + alpha * retain_loss(model, ref_model, inputs["retain"], retain_loss_type)


def install_as_modules(monkeypatch) -> None:
    """Make ``trainer.unlearn.base`` importable, as with open-unlearning's src/ on sys.path."""
    pkg, base, unlearn, unlearn_base = (
        types.ModuleType(n) for n in ("trainer", "trainer.base", "trainer.unlearn", "trainer.unlearn.base")
    )
    pkg.__path__, unlearn.__path__ = [], []
    base.FinetuneTrainer = FinetuneTrainer
    unlearn_base.UnlearnTrainer = UnlearnTrainer
    pkg.base, pkg.unlearn, unlearn.base = base, unlearn, unlearn_base
    for name, mod in (
        ("trainer", pkg),
        ("trainer.base", base),
        ("trainer.unlearn", unlearn),
        ("trainer.unlearn.base", unlearn_base),
    ):
        monkeypatch.setitem(__import__("sys").modules, name, mod)
