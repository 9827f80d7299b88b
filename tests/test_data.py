"""fastinfluence.data: the one prompt/response encoding (labels, eos rule, truncation, sources, batches)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fastinfluence import data
from fastinfluence.unlearn import UnlearnDataset

WORDS = "the a cat dog sat ran on under mat log red blue".split()


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_is_context_and_the_response_plus_eos_is_the_answer(tok):
    e = data.encode_example(tok, "the cat sat", "on a mat")
    answer = ids(tok, "on a mat") + [tok.eos_token_id]
    assert e["input_ids"] == ids(tok, "the cat sat") + answer
    assert e["labels"] == [-100] * 3 + answer and e["truncated"] is None
    assert data.encode_example(tok, "the cat sat", "on a mat", eos=False)["input_ids"][-1] != tok.eos_token_id


def test_truncation_cuts_the_prompt_start_and_keeps_the_answer(tok):
    e = data.encode_example(tok, "the cat sat on the mat", "red dog", max_length=5)
    assert e["input_ids"] == ids(tok, "the mat red dog") + [tok.eos_token_id] and e["truncated"] == "prompt"
    e = data.encode_example(tok, "the cat", "red dog ran on a log", max_length=4)  # the answer alone does not fit
    assert e["input_ids"] == ids(tok, "cat red dog ran") and e["labels"][0] == -100 and e["truncated"] == "response"


def test_truncated_examples_are_named_in_one_warning(tok, caplog):
    caplog.set_level(logging.WARNING, logger="fastinfluence.data")
    data.encode(
        tok,
        [{"id": "long", "prompt": "the cat sat on the mat", "response": "red"}, {"prompt": "a", "response": "b"}],
        max_length=4,
    )
    assert "1 of 2 examples are longer than max_length=4" in caplog.text and "'long'" in caplog.text


@pytest.mark.parametrize("response", ["", "   "])
def test_an_empty_answer_is_refused_by_id(tok, response):
    with pytest.raises(ValueError, match="example 'x': the response has no tokens"):
        data.encode(tok, [{"id": "x", "prompt": "the cat", "response": response}])


def test_jsonl_list_and_dataset_like_sources_give_the_same_batches(tok, tmp_path):
    rows = [
        {"prompt": "the cat", "response": "sat on a mat"},
        {"prompt": "a dog", "response": "ran"},
        {"prompt": "red", "response": "log"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class DatasetLike:  # iterates over mappings, as datasets.Dataset does
        def __iter__(self):
            return iter(rows)

    got = [data.batches(tok, src, batch_size=2) for src in (path, rows, DatasetLike())]
    for other in got[1:]:
        assert all(
            torch.equal(a[k], b[k]) for a, b in zip(got[0], other) for k in ("input_ids", "attention_mask", "labels")
        )
    b = got[0][0]
    assert b["ids"] == [0, 1] and b["input_ids"].shape == (2, 7)  # 2 + 4 + eos
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0] and b["labels"][1, -1] == -100  # right padding
    left = data.batches(tok, rows, batch_size=2, side="left")[0]
    assert left["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]
    loader = data.dataloader(tok, rows, batch_size=2)
    assert [x["input_ids"].shape[0] for x in loader] == [2, 1]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "a"}], "example 0: each example must be an object with 'prompt' and 'response'"),
        ([{"prompt": "a", "response": 3}], "'response' must be a string, got int"),
        ([{"id": 1, "prompt": "a", "response": "b"}, {"id": 1, "prompt": "a", "response": "b"}], "id 1 occurs twice"),
        ([], "no examples given"),
    ],
)
def test_bad_examples_are_named(tok, rows, match):
    with pytest.raises(ValueError, match=match):
        data.encode(tok, rows)


def _retain_indices(loader) -> list[int]:
    return sorted(int(i) for batch in loader for i in batch)


def test_unlearn_dataset_gives_workers_the_same_items_and_moves_on_each_epoch():
    forget = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]} for _ in range(4)]
    retain = [{"input_ids": [1, i + 5, 3], "labels": [-100, i + 5, 3]} for i in range(24)]
    ds = UnlearnDataset(forget, retain, ratio=2, seed=0)

    def collate(items):
        return [r["input_ids"][1] - 5 for it in items for r in it["retain"]]

    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate)
        seen.append(_retain_indices(loader))
        assert seen[-1] == _retain_indices(torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate))
    assert sorted(seen[0] + seen[1] + seen[2]) == list(range(24))  # three epochs walk the whole retain set once
