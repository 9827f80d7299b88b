"""Prompt/response examples into padded batches: the one encoding the CLI and the API share.

    import fastinfluence as fi
    batches = fi.data.batches(tokenizer, "train.jsonl", batch_size=8, max_length=512)
    loader = fi.data.dataloader(tokenizer, [{"prompt": "Q: 2+2?", "response": " 4"}], batch_size=4)

An example is a mapping with ``prompt`` and ``response`` strings and an optional ``id``
(default: its position). Sources: a JSONL file (one object per line), a list of dicts,
or a ``datasets.Dataset`` (anything that iterates over mappings).

The encoding of one example (``encode_example``):

- ``input_ids`` = prompt tokens (with the tokenizer's special tokens, e.g. BOS) +
  response tokens (none added) + the tokenizer's end-of-sequence token when ``eos=True``
  (the default; the model is scored on ending its answer). ``eos=False`` or a tokenizer
  without an eos token adds nothing.
- ``labels`` = -100 on the prompt tokens, the token ids on the response (and eos), so the
  per-example loss is the mean cross-entropy over the answer.
- Longer than ``max_length``: the prompt loses tokens from its start, so the answer and
  the context nearest it are kept; only when the answer alone does not fit (with one
  context token) is the answer's end cut. Truncated examples are counted and named in one
  warning.
- An empty response (no answer token) is refused: its loss is undefined.

Batches are right-padded (``side="left"`` pads on the left) with ``attention_mask`` 0 on
the padding; ``ids`` holds the example ids. ``batches(..., bucket=True)`` or ``max_tokens=``
groups examples by length so that a batch is padded only to its own longest example
(``batching.length_batches``); those batches carry ``positions`` (indices in data order),
and extraction hands their features back in data order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import errors
from .batching import length_batches

IGNORE_INDEX = -100
_PER_LINE = "one {'prompt', 'response'} object per line"
log = logging.getLogger(__name__)


def read_jsonl(path: str | Path, required: tuple[str, ...] = ("prompt", "response")) -> list[dict]:
    """Records of a JSONL file; each needs the ``required`` string fields (``id`` optional, default: its position)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a JSONL file with {_PER_LINE}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; give a JSONL file with {_PER_LINE}")
    records = []
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise ValueError(f"{path} is gzip-compressed: decompress it (gunzip) and give the JSONL file")
        f.seek(0)
        for n, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path} line {n + 1} is not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}): "
                    "JSONL must be UTF-8; convert the file (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path} line {n + 1} is not valid JSON ({exc.msg}); each line must be one JSON object "
                    f"with {_fields(required)}"
                ) from None
            _check_record(r, required, f"{path} line {n + 1}")
            r.setdefault("id", len(records))
            records.append(r)
    if not records:
        raise ValueError(f"{path} holds no examples; give one JSON object with {_fields(required)} per line")
    _check_unique_ids(records, str(path))
    return records


def _fields(required: tuple[str, ...]) -> str:
    return " and ".join(repr(k) for k in required)


def _check_record(r: Any, required: tuple[str, ...], where: str) -> None:
    if not isinstance(r, Mapping) or any(k not in r for k in required):
        raise ValueError(f"{where}: each example must be an object with {_fields(required)} fields")
    for k in required:
        if not isinstance(r[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(r[k]).__name__}")
    if "id" in r and (isinstance(r["id"], bool) or not isinstance(r["id"], (str, int))):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {type(r['id']).__name__}")


def _check_unique_ids(records: list[dict], where: str) -> None:
    seen: set = set()
    for r in records:
        if r["id"] in seen:
            raise ValueError(f"{where}: id {r['id']!r} occurs twice; example ids must be unique")
        seen.add(r["id"])


def read_examples(source, required: tuple[str, ...] = ("prompt", "response")) -> list[dict]:
    """Examples from a JSONL path, a list of dicts or a ``datasets.Dataset``, as checked dicts with ids."""
    if isinstance(source, (str, Path)):
        return read_jsonl(source, required)
    if isinstance(source, Mapping):
        raise TypeError("examples must be a JSONL path, a list of dicts or a datasets.Dataset, not one dict")
    records = []
    for i, r in enumerate(source):
        _check_record(r, required, f"example {i}")
        records.append(dict(r, id=r["id"] if r.get("id") is not None else i))
    if not records:
        raise ValueError("no examples given; pass at least one {'prompt', 'response'} example")
    _check_unique_ids(records, "the examples")
    return records


def encode_example(tokenizer, prompt: str, response: str, max_length: int = 512, eos: bool = True) -> dict:
    """``{"input_ids", "labels", "truncated"}`` of one example (lists of ints; see module docstring).

    ``truncated``: None, ``"prompt"`` (its start was cut) or ``"response"`` (its end was cut too).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one context token and one answer token), got {max_length}")
    p = list(tokenizer(prompt)["input_ids"])
    a = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if not a:
        raise ValueError("the response has no tokens: its loss is undefined; give every example a non-empty answer")
    if eos and tokenizer.eos_token_id is not None:
        a.append(tokenizer.eos_token_id)
    truncated = None
    if len(p) + len(a) > max_length:
        keep_a = min(len(a), max_length - min(1, len(p)))
        truncated = "prompt" if keep_a == len(a) else "response"
        a = a[:keep_a]
        p = p[len(p) - (max_length - keep_a) :] if max_length > keep_a else []
    return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a, "truncated": truncated}


def encode(tokenizer, examples, max_length: int = 512, eos: bool = True, fields: tuple[str, ...] = ()) -> list[dict]:
    """Encoded examples ``{"id", "input_ids", "labels"}`` (plus ``<field>`` encodings of the extra
    response ``fields``, e.g. ``clean_response``, when an example has them). One warning names
    the truncated examples."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one context token and one answer token), got {max_length}")
    records = read_examples(examples)
    out, cut = [], {"prompt": [], "response": []}
    for r in records:
        try:
            e = encode_example(tokenizer, r["prompt"], r["response"], max_length, eos)
            extra = {f: encode_example(tokenizer, r["prompt"], r[f], max_length, eos) for f in fields if f in r}
        except ValueError as exc:
            raise ValueError(f"example {r['id']!r}: {exc}") from None
        if e["truncated"]:
            cut[e["truncated"]].append(r["id"])
        item = {"id": r["id"], "input_ids": e["input_ids"], "labels": e["labels"]}
        item.update({f: {"input_ids": x["input_ids"], "labels": x["labels"]} for f, x in extra.items()})
        out.append(item)
    if cut["prompt"]:
        log.warning(
            "%d of %d examples are longer than max_length=%d: their prompts were cut from the start, "
            "answers kept (ids %s)",
            len(cut["prompt"]),
            len(out),
            max_length,
            _some(cut["prompt"]),
        )
    if cut["response"]:
        log.warning(
            "%d of %d examples have answers longer than max_length=%d: their answers were cut "
            "(ids %s); raise max_length",
            len(cut["response"]),
            len(out),
            max_length,
            _some(cut["response"]),
        )
    return out


def _some(ids: list) -> str:
    return ", ".join(map(repr, ids[:5])) + (", ..." if len(ids) > 5 else "")


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its eos token, else 0 (padding is masked, so any id works)."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def pad(examples: list[Mapping], pad_token_id: int = 0, side: str = "right") -> dict:
    """Pad encoded examples into one batch: input_ids, attention_mask, labels (B, T) int64, ids (B,)."""
    import torch

    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl], labels[b, sl], mask[b, sl] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all("id" in e for e in examples):
        batch["ids"] = [e["id"] for e in examples]
    return batch


def batches(
    tokenizer,
    examples,
    batch_size: int | None = None,
    max_length: int = 512,
    eos: bool = True,
    side: str = "right",
    bucket: bool = False,
    max_tokens: int | None = None,
    window: int | None = 1024,
) -> list[dict]:
    """Padded batches of ``batch_size`` examples in order (the batches ``GradientExtractor.extract`` takes).

    ``bucket=True`` (implied by ``max_tokens``) groups the examples by length so that little
    compute goes to padding: ``window`` examples at a time are sorted longest first and cut
    into batches of at most ``batch_size`` examples and ``max_tokens`` padded tokens
    (``batch_size`` None, the default, with ``max_tokens``: the token budget alone; without it,
    8 examples per batch, as on the command line); see ``batching.length_batches``. Each
    batch then also holds ``positions``, its examples' indices in data order, so that
    extraction hands features and stores back in data order.
    """
    batch_size = _check_batching(batch_size, bucket, max_tokens, window)
    enc = encode(tokenizer, examples, max_length, eos)
    pid = pad_token_id(tokenizer)
    if not (bucket or max_tokens is not None):
        return [pad(enc[s : s + batch_size], pid, side) for s in range(0, len(enc), batch_size)]
    _check_budget(enc, max_tokens)
    plan = length_batches([len(e["input_ids"]) for e in enc], batch_size, max_tokens, window)
    return [dict(pad([enc[i] for i in idx], pid, side), positions=idx) for idx in plan]


class Collator:
    """``DataLoader`` collate function over encoded examples (see ``pad``); examples holding a
    ``position`` (their index in data order) give the batch its ``positions``."""

    def __init__(self, pad_token_id: int = 0, side: str = "right"):
        self.pad_token_id, self.side = pad_token_id, side

    def __call__(self, examples: list[Mapping]) -> dict:
        batch = pad(examples, self.pad_token_id, self.side)
        if examples and all("position" in e for e in examples):
            batch["positions"] = [e["position"] for e in examples]
        return batch


def dataloader(
    tokenizer,
    examples,
    batch_size: int | None = None,
    max_length: int = 512,
    eos: bool = True,
    side: str = "right",
    bucket: bool = False,
    max_tokens: int | None = None,
    window: int | None = 1024,
    **kwargs,
):
    """A ``torch.utils.data.DataLoader`` of padded batches; ``kwargs`` (``shuffle``, ``num_workers``) go to it.

    ``bucket`` / ``max_tokens`` / ``window``: length-bucketed batches with ``positions``, as
    :func:`batches` makes them (a fixed batch plan: ``shuffle`` does not apply); ``batch_size``
    as there (None: 8, or no cap under ``max_tokens``).
    """
    from torch.utils.data import DataLoader

    batch_size = _check_batching(batch_size, bucket, max_tokens, window)
    enc = encode(tokenizer, examples, max_length, eos)
    collate = Collator(pad_token_id(tokenizer), side)
    if not (bucket or max_tokens is not None):
        return DataLoader(enc, batch_size=batch_size, collate_fn=collate, **kwargs)
    if kwargs.get("shuffle"):
        raise ValueError("shuffle=True does not apply to length-bucketed batches; give length_batches a seed instead")
    _check_budget(enc, max_tokens)
    plan = length_batches([len(e["input_ids"]) for e in enc], batch_size, max_tokens, window)
    kwargs.pop("shuffle", None)
    return DataLoader(
        [dict(e, position=i) for i, e in enumerate(enc)], batch_sampler=plan, collate_fn=collate, **kwargs
    )


def _check_batching(batch_size, bucket, max_tokens, window) -> int | None:
    """The batching arguments checked before any encoding; returns the batch size to use."""
    for name, v in (("batch_size", batch_size), ("max_tokens", max_tokens), ("window", window)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    if not isinstance(bucket, bool):
        raise ValueError(f"bucket must be True or False, got {bucket!r}")
    if batch_size is None and max_tokens is None:
        return 8
    return batch_size


def _check_budget(enc: list[dict], max_tokens: int | None) -> None:
    if max_tokens is None:
        return
    longest = max(enc, key=lambda e: len(e["input_ids"]))
    n = len(longest["input_ids"])
    if n > max_tokens:
        raise errors.FastInfluenceError(
            f"example {longest['id']!r} has {n} tokens, more than {errors.name('max_tokens', max_tokens)}: raise "
            f"{errors.name('max_tokens')} to at least {n} or lower {errors.name('max_length')}",
            "max_tokens",
        )
