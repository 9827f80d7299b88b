"""Attribution quality: planted-source recall and LDS of exact, projected EK-FAC and full K-FAC / EK-FAC.

Task: a tiny Llama is trained briefly from scratch on N random token sequences. Each of Q
queries copies the first half of one train example (its planted source) and continues with
fresh random tokens; a method is good when it ranks the source first. LDS retrains the model
from the same initialisation on M random halves of the train set and correlates each query's
summed influence over the half with its loss after retraining (``fastinfluence.evaluate.lds``).

Methods (all on the attention and MLP Linear layers, dot products, float32):
    exact_dot          exact_scores (no preconditioning)
    projected_ekfac_k  GradientExtractor at rank k x k, score(precondition="ekfac")
    kfac_full          kfac_scores(method="kfac")
    ekfac_full         kfac_scores(method="ekfac")

``--peer`` also times full EK-FAC on the peer benchmark setting (tiny Llama hidden 256,
4 layers, vocab 512; 512 train + 64 query sequences of 64 tokens).

    nice -n 10 python bench/attribution_quality.py [--out bench/results/attribution_quality_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastinfluence as fi
from fastinfluence.evaluate import lds, recall_at_k

LAYERS = [r"self_attn\.|mlp\."]


def build_model(vocab: int, hidden: int, intermediate: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def batches(tokens: torch.Tensor, size: int) -> list[dict]:
    """Every token a label (the causal shift drops the first)."""
    return [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t} for t in tokens.split(size)]


def train(model, tokens: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 3e-3):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        t = tokens[torch.randint(0, len(tokens), (batch,), generator=g)]
        loss = model(input_ids=t, labels=t).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def query_losses(model, tokens: torch.Tensor) -> torch.Tensor:
    """(Q,) mean next-token cross-entropy of each query."""
    logits = model(input_ids=tokens).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(len(tokens), -1).mean(1).double()


def projected_ekfac(model, qb, tb, rank: int) -> torch.Tensor:
    ex = fi.GradientExtractor(model, fi.ProjectionConfig(rank_in=rank, rank_out=rank, include=LAYERS))
    train_f, query_f = ex.extract(tb, covariances=True), ex.extract(qb)
    res = fi.score(query_f, train_f, precondition="ekfac", topk=None, aggregates=())
    return torch.zeros(res.topk_values.shape).scatter_(1, res.topk_indices, res.topk_values)


def methods(config: fi.ProjectionConfig) -> dict:
    return {
        "exact_dot": lambda m, qb, tb: fi.exact_scores(m, qb, tb, config=config),
        "projected_ekfac_64": lambda m, qb, tb: projected_ekfac(m, qb, tb, 64),
        "projected_ekfac_128": lambda m, qb, tb: projected_ekfac(m, qb, tb, 128),
        "kfac_full": lambda m, qb, tb: fi.kfac_scores(m, qb, tb, method="kfac", config=config),
        "ekfac_full": lambda m, qb, tb: fi.kfac_scores(m, qb, tb, method="ekfac", config=config),
    }


def model_info(model, args) -> dict:
    return {
        "arch": "llama",
        "vocab": args.vocab,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "params": sum(p.numel() for p in model.parameters()),
    }


def task_info(args, final_loss: float, train_s: float) -> dict:
    return {
        "n_train": args.n_train,
        "n_query": args.n_query,
        "length": args.length,
        "train_steps": args.steps,
        "batch": args.batch,
        "final_train_loss": final_loss,
        "train_s": train_s,
        "captured_layers": LAYERS,
    }


def quality(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    V, L, N, Q = args.vocab, args.length, args.n_train, args.n_query
    train_tokens = torch.randint(0, V, (N, L), generator=g)
    sources = torch.randperm(N, generator=g)[:Q]
    query_tokens = torch.cat([train_tokens[sources, : L // 2], torch.randint(0, V, (Q, L - L // 2), generator=g)], 1)
    dims = (V, args.hidden, args.intermediate, args.layers)

    t0 = time.perf_counter()
    model = build_model(*dims, seed=args.seed)
    final_loss = train(model, train_tokens, args.steps, args.batch, args.seed)
    train_s = time.perf_counter() - t0
    qb, tb = batches(query_tokens, args.batch), batches(train_tokens, args.batch)
    config = fi.ProjectionConfig(include=LAYERS)

    results, scores = {}, {}
    for name, fn in methods(config).items():
        t, c = time.perf_counter(), time.process_time()
        S = fn(model, qb, tb).double()
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
        scores[name] = S
        results[name] = {
            "top1": recall_at_k(S, sources.tolist(), 1),
            "recall_at_5": recall_at_k(S, sources.tolist(), 5),
            "recall_at_10": recall_at_k(S, sources.tolist(), 10),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
        }
        print(name, json.dumps(results[name]), flush=True)

    if args.subsets < 2:
        return {"model": model_info(model, args), "task": task_info(args, final_loss, train_s), "methods": results}
    # LDS: retrain from the same initialisation on random halves; same steps and batch size.
    subsets = [torch.randperm(N, generator=g)[: int(N * args.subset_fraction)] for _ in range(args.subsets)]
    t = time.perf_counter()
    losses = []
    for m, rows in enumerate(subsets):
        retrained = build_model(*dims, seed=args.seed)
        train(retrained, train_tokens[rows], args.steps, args.batch, args.seed + 1 + m)
        losses.append(query_losses(retrained, query_tokens))
        print(f"retrained {m + 1}/{len(subsets)}", flush=True)
    losses = torch.stack(losses)
    retrain_s = time.perf_counter() - t
    for name, S in scores.items():
        results[name]["lds"] = lds(S, [r.tolist() for r in subsets], losses)
        print(name, "lds", results[name]["lds"], flush=True)
    return {
        "model": model_info(model, args),
        "task": task_info(args, final_loss, train_s),
        "lds_setup": {"subsets": args.subsets, "subset_fraction": args.subset_fraction, "retrain_s": retrain_s},
        "methods": results,
    }


def peer_timing(args) -> dict:
    """Full EK-FAC on the peer benchmark setting: random-init model (timing does not depend on training)."""
    g = torch.Generator().manual_seed(args.seed)
    model = build_model(512, 256, args.peer_intermediate, 4, args.seed)
    train_tokens = torch.randint(0, 512, (512, 64), generator=g)
    query_tokens = torch.randint(0, 512, (64, 64), generator=g)
    qb, tb = batches(query_tokens, 32), batches(train_tokens, 32)
    config = fi.ProjectionConfig(include=LAYERS)
    t, c = time.perf_counter(), time.process_time()
    factors = fi.fit_kfac(model, tb, method="ekfac", config=config)
    fit_s, fit_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    S = fi.kfac_scores(model, qb, tb, factors=factors, config=config)
    score_s, score_cpu = time.perf_counter() - t, time.process_time() - c
    out = {
        "model": {
            "arch": "llama",
            "vocab": 512,
            "hidden": 256,
            "intermediate": args.peer_intermediate,
            "layers": 4,
            "params": sum(p.numel() for p in model.parameters()),
        },
        "n_train": 512,
        "n_query": 64,
        "length": 64,
        "batch": 32,
        "captured_layers": LAYERS,
        "scores_shape": list(S.shape),
        "load_average_at_end": os.getloadavg()[0],
        "ekfac_fit_s": fit_s,
        "ekfac_score_s": score_s,
        "ekfac_total_s": fit_s + score_s,
        # CPU seconds of this process: what one dedicated core would take, whatever else the machine runs
        "ekfac_fit_cpu_s": fit_cpu,
        "ekfac_score_cpu_s": score_cpu,
        "ekfac_total_cpu_s": fit_cpu + score_cpu,
        "peer_reported_s": {"dattri_llm": 81.5, "kronfluence": 184.0},
    }
    print("peer", json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-query", type=int, default=32)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=16, help="retrained subsets for LDS (below 2: no LDS)")
    ap.add_argument("--subset-fraction", type=float, default=0.5)
    ap.add_argument("--peer", action="store_true", help="also time full EK-FAC on the peer benchmark setting")
    ap.add_argument("--peer-only", action="store_true", help="only the peer timing, into the existing --out file")
    ap.add_argument("--peer-intermediate", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/attribution_quality_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    run = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }
    if args.peer_only:  # re-time the peer setting, keeping the quality results already written
        with open(args.out) as f:
            result = json.load(f)
        result["peer_setting"] = {**run, **peer_timing(args)}
    else:
        result = {"bench": "attribution_quality", **run, "quality": quality(args)}
        if args.peer:
            result["peer_setting"] = {**run, **peer_timing(args)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
