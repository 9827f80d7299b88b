"""A deterministic stand-in for GradientExtractor, shared by the store, scoring and distributed tests.

Each token id v has fixed projected factors a~ = Ea[layer][v] (k_in,) and g~ = Eg[layer][v]
(k_out,), so phi_i[layer] = sum_t g~_t a~_t^T exactly as for a real model, and the per-token
factors, covariance sums and norms are all consistent. It follows the extractor interface
that ``write_store`` uses: ``metadata()`` and ``iter_features(batches, skip_examples=...)``.
"""

from __future__ import annotations

import json
import time

import torch

from fastinfluence.config import ProjectionConfig
from fastinfluence.features import Features, LayerSlice, TokenFactors, cat_features

LAYERS = {"model.layers.0.mlp": (3, 5), "model.layers.1.attn": (4, 2)}


class TokenTableExtractor:
    def __init__(self, vocab=40, layers=LAYERS, dtype="float32", seed=0, delay=0.0):
        gen = torch.Generator().manual_seed(1000 + seed)
        self.Ea = {n: torch.randn(vocab, ki, generator=gen, dtype=torch.float64) for n, (ko, ki) in layers.items()}
        self.Eg = {n: torch.randn(vocab, ko, generator=gen, dtype=torch.float64) for n, (ko, ki) in layers.items()}
        self.layout, start = {}, 0
        for n, (ko, ki) in layers.items():
            self.layout[n] = LayerSlice(start, start + ko * ki, (ko, ki))
            start += ko * ki
        self.config = ProjectionConfig(rank_in=8, rank_out=8, seed=seed, dtype=dtype)
        self.fingerprint = {"model": "token-table", "vocab": vocab, "layers": {n: list(s) for n, s in layers.items()}}
        self.delay = delay

    def metadata(self):
        return {
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "dtype": self.config.dtype,
        }

    def _batch(self, batch, ids, tokens, covariances):
        ids_t, mask = batch["input_ids"], batch["attention_mask"].bool()
        rows, offsets, a_tok, g_tok, stats = [], [0], {n: [] for n in self.layout}, {n: [] for n in self.layout}, {}
        for b in range(len(ids_t)):
            toks = ids_t[b][mask[b]]
            offsets.append(offsets[-1] + len(toks))
            row = []
            for n in self.layout:
                a, g = self.Ea[n][toks], self.Eg[n][toks]
                row.append((g.T @ a).reshape(-1))
                a_tok[n].append(a)
                g_tok[n].append(g)
            rows.append(torch.cat(row))
        data = torch.stack(rows)
        for n in self.layout:
            A, G = torch.cat(a_tok[n]), torch.cat(g_tok[n])
            stats[n] = (A.T @ A, G.T @ G, A.shape[0])
        tf = None
        if tokens:
            tf = TokenFactors(
                torch.tensor(offsets),
                {n: torch.cat(v).float() for n, v in a_tok.items()},
                {n: torch.cat(v).float() for n, v in g_tok.items()},
            )
        return Features(
            data.to(self.config.torch_dtype),
            data.norm(dim=1).float(),
            ids,
            dict(self.layout),
            self.config,
            self.fingerprint,
            tf,
            stats if covariances else None,
        )

    def iter_features(self, batches, skip_examples=0, tokens=False, covariances=False):
        seen = 0
        for batch in batches:
            n = len(batch["input_ids"])
            ids = list(batch["ids"]) if "ids" in batch else list(range(seen, seen + n))
            seen += n
            if skip_examples >= n:
                skip_examples -= n
                continue
            time.sleep(self.delay)
            f = self._batch(batch, ids, tokens, covariances)
            if skip_examples:
                from fastinfluence.features import slice_rows

                f = slice_rows(f, skip_examples, n)
                skip_examples = 0
            yield f

    def extract(self, batches, tokens=False, covariances=False):
        return cat_features(list(self.iter_features(batches, tokens=tokens, covariances=covariances)))


class BatchTokenTableExtractor(TokenTableExtractor):
    """``TokenTableExtractor`` with the per-batch interface ``write_store`` commits batch by batch
    (``iter_batch_features``, as ``GradientExtractor``); ``log``: a file each computed batch's example
    ids are appended to, as JSON (what a test counts recomputation with)."""

    def __init__(self, *args, log=None, **kw):
        super().__init__(*args, **kw)
        self.log = log

    def iter_batch_features(self, batches, skip_examples=0, done=(), tokens=False, covariances=False, progress=None):
        from fastinfluence.batching import WindowTracker, batch_positions

        tracker = WindowTracker()
        for batch in batches:
            n = len(batch["input_ids"])
            positions = batch_positions(batch, n) or tracker.following(n)
            closes = tracker.add(n, positions)
            wanted = sum(p >= skip_examples and p not in done for p in positions)
            f = None
            if wanted:
                time.sleep(self.delay)
                f = self._batch(batch, list(batch["ids"]), tokens, covariances)
                if self.log is not None:
                    with open(self.log, "a") as out:
                        out.write(json.dumps([str(i) for i in batch["ids"]]) + "\n")  # positions are run-relative
                if progress is not None:
                    progress(wanted)
            yield positions, f, closes


def shuffled_windows(batches, window, seed=0):
    """``batches`` (stream order, ``ids`` given) with their examples dealt into new batches of the same
    size in a shuffled order within each window of ``window`` batches, carrying ``positions``, as
    length bucketing reorders them."""
    gen, out = torch.Generator().manual_seed(seed), []
    size = len(batches[0]["input_ids"])
    for w in range(0, len(batches), window):
        group = batches[w : w + window]
        cat = {k: torch.cat([b[k] for b in group]) for k in ("input_ids", "attention_mask", "labels")}
        ids = [i for b in group for i in b["ids"]]
        perm = torch.randperm(len(ids), generator=gen).tolist()
        start = w * size
        for s in range(0, len(perm), size):
            idx = perm[s : s + size]
            b = {k: v[idx] for k, v in cat.items()}
            out.append(dict(b, ids=[ids[i] for i in idx], positions=[start + i for i in idx]))
    return out


def make_batches(num_batches, batch_size=3, seq=6, vocab=40, seed=0, with_ids=False):
    """Padded token batches (right padding, ragged lengths >= 1)."""
    gen = torch.Generator().manual_seed(seed)
    out, k = [], 0
    for _ in range(num_batches):
        ids = torch.randint(0, vocab, (batch_size, seq), generator=gen)
        lengths = torch.randint(1, seq + 1, (batch_size,), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        if with_ids:
            batch["ids"] = [f"ex{k + i}" for i in range(batch_size)]
        k += batch_size
        out.append(batch)
    return out
