"""The ``fastinfluence`` command line (also ``python -m fastinfluence``).

    fastinfluence extract --model DIR --data train.jsonl --out runs/train
    fastinfluence extract --model DIR --data queries.jsonl --out runs/query
    fastinfluence score --query runs/query --train runs/train --topk 10 --out top.csv

``extract`` and ``score`` live here; other modules plug in their subcommands: each module
in ``PLUGINS`` exposes ``register(subparsers)`` and sets ``func(args) -> int`` on its
parsers. A plugin that is not installed is left out. Run any command under
``torchrun --nproc_per_node=N`` to split the work over N processes.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import os
import sys
from pathlib import Path

PLUGINS = ("fastinfluence.demo", "fastinfluence.unlearn_cli", "fastinfluence.bench_cli")
log = logging.getLogger("fastinfluence")


# ----------------------------------------------------------------------------- data


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; each needs ``prompt`` and ``response`` (``id`` optional, default: line number)."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r, dict) or "prompt" not in r or "response" not in r:
                raise ValueError(f"{path} line {n + 1}: each line must be a JSON object with 'prompt' and 'response' fields")
            r.setdefault("id", len(records))
            records.append(r)
    if not records:
        raise ValueError(f"{path} holds no examples")
    return records


def encode(tokenizer, records: list[dict], batch_size: int, max_length: int) -> list[dict]:
    """Right-padded batches: prompt tokens are context (label -100), response tokens are scored."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for s in range(0, len(records), batch_size):
        rows = []
        for r in records[s : s + batch_size]:
            prompt = tokenizer(r["prompt"])["input_ids"]
            response = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                response = response + [tokenizer.eos_token_id]
            ids = (prompt + response)[:max_length]
            labels = ([-100] * len(prompt) + response)[:max_length]
            rows.append((ids, labels))
        T = max(len(ids) for ids, _ in rows)
        batches.append({
            "input_ids": torch.tensor([ids + [pad] * (T - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [-100] * (T - len(lab)) for _, lab in rows]),
            "ids": [r["id"] for r in records[s : s + batch_size]],
        })
    return batches


def load_model(path: str, torch_dtype: str, device: str):
    """(model, tokenizer) from a local HF model directory or a PEFT adapter directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, torch_dtype)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        # trainable adapters, so that the extractor captures the LoRA layers and not the frozen base
        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype, is_trainable=True)
        base = model.peft_config[next(iter(model.peft_config))].base_model_name_or_path
        tok_dir = path if (Path(path) / "tokenizer_config.json").exists() else base
    else:
        model, tok_dir = AutoModelForCausalLM.from_pretrained(path, dtype=dtype), path
    return model.to(device).eval(), AutoTokenizer.from_pretrained(tok_dir)


def projection_config(args):
    """ProjectionConfig from ``--config`` (JSON, or YAML with PyYAML) with command-line overrides."""
    from .config import ProjectionConfig

    values = {}
    if args.config:
        text = Path(args.config).read_text()
        if args.config.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ModuleNotFoundError:
                raise SystemExit(f"--config {args.config}: reading YAML needs PyYAML (pip install pyyaml), or give the config as JSON") from None
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    for field in ("rank_in", "rank_out", "kind", "seed", "include", "exclude", "dtype", "mode", "dim"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    return ProjectionConfig(**values)


def _device(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- extract


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face model directory, or a PEFT adapter directory (its base model is loaded from the path in adapter_config.json)")
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype the model is loaded in (default float32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: this rank's GPU when there is one, else cpu (default auto)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per example, prompt + response (default 512)")


def _extract(args) -> int:
    from . import distributed as dist
    from .extract import GradientExtractor
    from .store import write_store

    model, tok = load_model(args.model, args.torch_dtype, _device(args.device))
    extractor = GradientExtractor(model, projection_config(args))
    batches = encode(tok, read_jsonl(args.data), args.batch_size, args.max_length)
    store = write_store(
        args.out, extractor, batches, tokens=args.tokens, covariances=args.covariances, shard_rows=args.shard_rows,
        meta={"data": str(Path(args.data).resolve()), "model": str(Path(args.model).resolve())}, progress=not args.quiet,
    )
    if dist.rank_world()[0] == 0:
        log.info("store %s: %d rows of %d features in %d shards", store.path, store.num_rows, store.dim, len(store.shards))
    return 0


def _register_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="extract per-example gradient features of a JSONL data set into a feature store",
        description="Extract projected per-example gradient features into an on-disk FeatureStore. "
        "Running it again on the same --out resumes an interrupted run; a --data file that extends the "
        "old one appends the new examples.",
    )
    _add_model_args(p)
    p.add_argument("--data", required=True, metavar="JSONL", help="JSONL file, one example per line with 'prompt' and 'response' (and optional 'id'); the loss is taken on the response tokens")
    p.add_argument("--out", required=True, metavar="DIR", help="feature store directory (created, resumed or extended)")
    p.add_argument("--config", metavar="FILE", help="ProjectionConfig as a JSON or YAML file; the options below override its fields")
    p.add_argument("--rank-in", dest="rank_in", type=int, help="k_in, input-side projection width per layer (default 64)")
    p.add_argument("--rank-out", dest="rank_out", type=int, help="k_out, output-side projection width per layer (default 64)")
    p.add_argument("--kind", choices=["gaussian", "rademacher"], help="projection entries (default gaussian)")
    p.add_argument("--seed", type=int, help="projection seed (default 0)")
    p.add_argument("--include", nargs="+", help="regexes of layer names to capture (default: all trainable Linear layers)")
    p.add_argument("--exclude", nargs="+", help="regexes of layer names to skip")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], help="storage dtype of the features (default float32)")
    p.add_argument("--mode", choices=["factorized", "flat"], help="factorized per-layer projection or one flat JL projection (default factorized)")
    p.add_argument("--dim", type=int, help="output width of the flat mode (default 8192)")
    p.add_argument("--tokens", action="store_true", help="also store per-token factors (for per-token scores)")
    p.add_argument("--covariances", action="store_true", help="also store activation/gradient covariance sums (for kfac/ekfac preconditioning)")
    p.add_argument("--shard-rows", type=int, default=4096, help="rows per shard file (default 4096)")
    p.set_defaults(func=_extract)


# ----------------------------------------------------------------------------- score


def _texts(path: str | None) -> dict:
    if not path or not Path(path).exists():
        return {}
    return {r["id"]: r for r in read_jsonl(path)}


def _score(args) -> int:
    from . import distributed as dist
    from .extract import GradientExtractor
    from .scoring import score
    from .store import FeatureStore

    train = FeatureStore.open(args.train)
    if args.verify:
        train.verify()
    query_data = None
    if Path(args.query).is_dir():
        query = FeatureStore.open(args.query)
        query_data = query.meta.get("data")
    else:
        if not args.model:
            raise SystemExit("--query is a JSONL file: give --model to extract its features (with the train store's projection config)")
        from .config import ProjectionConfig

        model, tok = load_model(args.model, args.torch_dtype, _device(args.device))
        extractor = GradientExtractor(model, ProjectionConfig.from_dict(train.manifest["config"]))
        query = extractor.extract(encode(tok, read_jsonl(args.query), args.batch_size, args.max_length))
        query_data = args.query
    result = score(
        query, train, metric=args.metric, precondition=args.precondition, topk=args.topk,
        layer_normalize=args.layer_normalize, matrix_path=args.matrix, chunk_rows=args.chunk_rows,
        damping=args.damping, progress=not args.quiet,
    )
    if dist.rank_world()[0] == 0:
        write_topk(result, args.out, _texts(args.query_data or query_data), _texts(args.train_data or train.meta.get("data")))
        log.info("wrote the top-%d of %d queries over %d train rows to %s", result.topk_values.shape[1], len(result.query_ids), len(result.train_ids), args.out)
    return 0


def write_topk(result, out: str, query_texts: dict, train_texts: dict) -> None:
    """Top-k as JSON (one object per query) or CSV (one row per query x rank), with example texts."""
    def text(table, key, field):
        return table.get(key, {}).get(field)

    rows = []
    for q, qid in enumerate(result.query_ids):
        for r, (row, tid, v) in enumerate(zip(result.topk_indices[q].tolist(), result.topk_ids[q], result.topk_values[q].tolist())):
            rows.append({
                "query_id": qid, "rank": r + 1, "train_row": row, "train_id": tid, "score": v,
                "query_prompt": text(query_texts, qid, "prompt"), "query_response": text(query_texts, qid, "response"),
                "train_prompt": text(train_texts, tid, "prompt"), "train_response": text(train_texts, tid, "response"),
            })
    if out.endswith(".csv"):
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["query_id"])
            w.writeheader()
            w.writerows(rows)
        return
    queries = [{"id": qid, "prompt": text(query_texts, qid, "prompt"), "response": text(query_texts, qid, "response"),
                "top": [{k: v for k, v in r.items() if not k.startswith("query")} for r in rows if r["query_id"] == qid]}
               for qid in result.query_ids]
    with open(out, "w") as f:
        json.dump({"metric": result.metric, "precondition": result.precondition, "queries": queries}, f, indent=2)


def _register_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score queries against a train feature store and write the top-k with example texts",
        description="Influence scores of every query against every train example, streamed over the train "
        "store. Writes the top-k train examples per query (with their texts) as JSON or CSV.",
    )
    p.add_argument("--train", required=True, metavar="DIR", help="train feature store directory")
    p.add_argument("--query", required=True, metavar="DIR|JSONL", help="query feature store directory, or a JSONL file (then --model is needed)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file: .csv for one row per query and rank, anything else for JSON")
    p.add_argument("--metric", default="dot", choices=["dot", "cosine"], help="dot product or cosine of the (preconditioned) features (default dot)")
    p.add_argument("--precondition", default=None, choices=["identity", "diagonal", "kfac", "ekfac", "full"], help="curvature fitted on the train store and cached beside it (default none); kfac/ekfac need a store extracted with --covariances")
    p.add_argument("--damping", type=float, help="absolute damping of the preconditioner (default 0.1 x its mean eigenvalue)")
    p.add_argument("--topk", type=int, default=10, help="train examples kept per query (default 10)")
    p.add_argument("--layer-normalize", action="store_true", help="scale each layer's features to unit norm before summing layers")
    p.add_argument("--chunk-rows", type=int, default=8192, help="train rows scored at a time; bounds the memory (default 8192)")
    p.add_argument("--matrix", metavar="NPY", help="also write the full query x train score matrix to this .npy file (memory-mapped)")
    p.add_argument("--verify", action="store_true", help="check every shard checksum of the train store first")
    p.add_argument("--train-data", metavar="JSONL", help="JSONL with the train texts (default: the file recorded at extraction)")
    p.add_argument("--query-data", metavar="JSONL", help="JSONL with the query texts (default: the query JSONL, or the file recorded at extraction)")
    p.add_argument("--model", metavar="DIR", help="model or adapter directory, to extract the features of a JSONL --query")
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype the model is loaded in (default float32)")
    p.add_argument("--device", default="auto", help="device of the model for a JSONL --query (default auto)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch for a JSONL --query (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per query example (default 512)")
    p.set_defaults(func=_score)


# ----------------------------------------------------------------------------- program


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastinfluence",
        description="Fast, low-memory influence estimation and influence-guided unlearning for Hugging Face causal LMs.",
        epilog="examples:\n"
        "  fastinfluence extract --model DIR --data train.jsonl --out runs/train --covariances\n"
        "  fastinfluence extract --model DIR --data queries.jsonl --out runs/query\n"
        "  fastinfluence score --query runs/query --train runs/train --precondition kfac --topk 10 --out top.csv\n"
        "  torchrun --nproc_per_node=2 -m fastinfluence extract ...   (ranks split the examples)\n"
        "'fastinfluence COMMAND --help' explains every option of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity (default INFO)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (give it before the command: fastinfluence --quiet score ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _register_extract(sub)
    _register_score(sub)
    for name in PLUGINS:
        _plug(name, sub)
    return parser


def _plug(module: str, sub) -> None:
    """Add the subcommands of ``module``; one that is absent or broken is left out (with a warning when broken)."""
    try:
        importlib.import_module(module).register(sub)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            log.warning("the commands of %s are unavailable: %s", module, exc)
    except Exception as exc:  # a broken plugin must not take the other commands down
        log.warning("the commands of %s are unavailable: %s: %s", module, type(exc).__name__, exc)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    logging.getLogger("fastinfluence").setLevel(args.log_level)
    from . import distributed as dist

    dist.init_from_env()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
