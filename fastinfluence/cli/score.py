"""Score queries against a train feature store and write the top-k with example texts.

    fastinfluence score --query runs/query --train runs/train --precondition kfac --topk 10 --out top.csv

The scoring flags are ``ScoreOptions`` fields (``fastinfluence.options``), with its defaults.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
from pathlib import Path

from ..errors import UsageError
from ..options import METRICS, PRECONDITIONERS, ScoreOptions
from .common import (
    add_model_args,
    check_batches,
    check_model_args,
    device,
    encode,
    file_digest,
    load_model,
    log,
    read_jsonl,
    summary,
)
from .options import SCORE_FLAGS, add, build


def _texts(path: str | None, digest: str | None, flag: str, explicit: bool) -> dict:
    """id -> record of the texts file.

    A file that changed since extraction is refused (or, given explicitly, warned about).
    """
    if not path:
        return {}
    if not Path(path).is_file():
        if explicit:
            raise UsageError(f"{flag} {path}: no such file")
        raise UsageError(
            f"the texts of the store's examples were read from {path}, which is gone: give {flag} FILE "
            "with the same examples, or --no-texts to write the scores without texts"
        )
    if digest is not None and file_digest(path) != digest:
        if not explicit:
            raise UsageError(
                f"{path} changed since the store was extracted from it (its SHA-256 differs), so its texts "
                f"may not be the store's examples: give {flag} FILE with the original examples, or --no-texts"
            )
        log.warning("%s %s differs from the file the store was extracted from; its texts are matched by id", flag, path)
    return {r["id"]: r for r in read_jsonl(path)}


def _store_texts(store, given: str | None, flag: str) -> dict:
    """id -> record of ``given`` (the user's texts file), else of the file recorded at extraction,
    refused if it changed since."""
    if given:
        return _texts(given, None, flag, True)
    return _texts(store.meta.get("data"), store.meta.get("data_sha256"), flag, False)


def _check_texts(table: dict, ids, flag: str, path) -> None:
    missing = [i for i in ids if i not in table]
    if table and missing:
        raise UsageError(
            f"{path} has no example with ids {missing[:5]} (of {len(missing)} scored ones): give {flag} "
            "with the file the store was extracted from, or --no-texts"
        )


def _score(args) -> int:
    from .. import distributed as dist
    from ..outputs import atomic_path, check_file
    from ..store import FeatureStore

    options = build(ScoreOptions, args, SCORE_FLAGS, matrix_path=None, progress=not args.quiet)
    out = check_file(args.out, "--out", args.overwrite)
    train = FeatureStore.open(args.train)
    if args.precondition in ("kfac", "ekfac") and not train.has_covariances:
        raise UsageError(
            f"--precondition {args.precondition} needs a train store extracted with --covariances; "
            f"re-run extract with --covariances into a new --out, or use --precondition diagonal"
        )
    if args.verify:
        summary = train.verify()
        log.info(
            "verified %d shard files (%d rows, %.1f MiB)", summary["files"], summary["rows"], summary["bytes"] / 2**20
        )
    jsonl_query = not Path(args.query).is_dir()
    if jsonl_query:
        if not args.model:
            raise UsageError(
                "--query is a JSONL file: give --model to extract its features (with the train store's projection "
                "config)"
            )
        check_model_args(args)
        query_records = read_jsonl(args.query)
    else:
        query = FeatureStore.open(args.query)
    n_query = len(query_records) if jsonl_query else len(query)
    matrix = (
        check_file(args.matrix, "--matrix", args.overwrite, need_bytes=n_query * len(train) * 4 + 4096)
        if args.matrix
        else None
    )
    texts = not args.no_texts
    train_texts = _store_texts(train, args.train_data, "--train-data") if texts else {}
    if jsonl_query:
        query_texts = {r["id"]: r for r in query_records} if texts else {}
        query = _query_features(args, train, query_records)
    else:
        query_texts = _store_texts(query, args.query_data, "--query-data") if texts else {}
    _check_texts(train_texts, train.ids, "--train-data", args.train_data or train.meta.get("data"))
    _check_texts(query_texts, query.ids, "--query-data", args.query_data or args.query)
    result = _run_score(options, query, train, matrix)
    if dist.rank_world()[0] == 0:
        with atomic_path(out) as tmp:
            write_topk(result, str(tmp), query_texts, train_texts, csv_format=out.suffix == ".csv")
        log.info(
            "wrote the top-%d of %d queries over %d train rows to %s",
            result.topk_values.shape[1],
            len(result.query_ids),
            len(result.train_ids),
            out,
        )
    return 0


def _query_features(args, train, records):
    from ..config import ProjectionConfig
    from ..extract import GradientExtractor
    from ..store.format import check_same_origin

    model, tok = load_model(args.model, args.model_dtype, device(args.device))
    extractor = GradientExtractor(model, ProjectionConfig.from_dict(train.manifest["config"]))
    # Before any query is extracted: features of another model would only be refused when scored.
    check_same_origin(extractor.metadata(), train.metadata(), f"--model {args.model}", f"the train store {args.train}")
    batches = encode(tok, records, args.batch_size, args.max_length, args.eos)
    check_batches(model, batches)
    return extractor.extract(batches)


def _run_score(options, query, train, matrix: Path | None):
    """``score``; the library writes the matrix under a temporary name and renames it when whole
    (``--overwrite`` was applied when the paths were checked)."""
    from ..scoring import score

    return score(query, train, dataclasses.replace(options, matrix_path=matrix, overwrite=True))


def write_topk(result, out: str, query_texts: dict, train_texts: dict, csv_format: bool | None = None) -> None:
    """Top-k as JSON (one object per query) or CSV (one row per query x rank), with example texts."""

    def text(table, key, field):
        return table.get(key, {}).get(field)

    rows = []
    for q, qid in enumerate(result.query_ids):
        for r, (row, tid, v) in enumerate(
            zip(result.topk_indices[q].tolist(), result.topk_ids[q], result.topk_values[q].tolist())
        ):
            rows.append(
                {
                    "query_id": qid,
                    "rank": r + 1,
                    "train_row": row,
                    "train_id": tid,
                    "score": v,
                    "query_prompt": text(query_texts, qid, "prompt"),
                    "query_response": text(query_texts, qid, "response"),
                    "train_prompt": text(train_texts, tid, "prompt"),
                    "train_response": text(train_texts, tid, "response"),
                }
            )
    if csv_format if csv_format is not None else out.endswith(".csv"):
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["query_id"])
            w.writeheader()
            w.writerows(rows)
        return
    queries = [
        {
            "id": qid,
            "prompt": text(query_texts, qid, "prompt"),
            "response": text(query_texts, qid, "response"),
            "top": [{k: v for k, v in r.items() if not k.startswith("query")} for r in rows if r["query_id"] == qid],
        }
        for qid in result.query_ids
    ]
    with open(out, "w") as f:
        json.dump({"metric": result.metric, "precondition": result.precondition, "queries": queries}, f, indent=2)


def add_scoring(p) -> None:
    """The ``ScoreOptions`` flags of every command that scores a store."""
    option = functools.partial(add, p, ScoreOptions, SCORE_FLAGS)
    option("metric", "dot product or cosine of the (preconditioned) features", choices=METRICS)
    option(
        "precondition",
        "curvature fitted on the train store and cached beside it; kfac/ekfac need a store extracted with "
        "--covariances",
        choices=PRECONDITIONERS,
    )
    option("damping", "absolute damping of the preconditioner, > 0 (none: 0.1 x its mean eigenvalue)", type=float)
    option("layer_normalize", "scale each layer's features to unit norm before summing layers")
    option("chunk_rows", "train rows scored at a time; bounds the memory")
    option(
        "allow_incomplete",
        "score the rows of a store whose extraction was interrupted (refused otherwise: resume the extraction)",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help=summary(__doc__),
        description="Influence scores of every query against every train example, streamed over the train "
        "store. Writes the top-k train examples per query (with their texts) as JSON or CSV.",
    )
    p.add_argument("--train", required=True, metavar="DIR", help="train feature store directory")
    p.add_argument(
        "--query",
        required=True,
        metavar="DIR|JSONL",
        help="query feature store directory, or a JSONL file (then --model is needed)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output file: .csv for one row per query and rank, anything else for JSON",
    )
    option = functools.partial(add, p, ScoreOptions, SCORE_FLAGS)
    option("overwrite", "replace --out / --matrix when they exist (refused otherwise)")
    option("topk", "train examples kept per query")
    add_scoring(p)
    p.add_argument(
        "--matrix",
        metavar="NPY",
        help="also write the full query x train score matrix to this .npy file (memory-mapped; free space is checked "
        "first)",
    )
    p.add_argument("--verify", action="store_true", help="check every shard checksum of the train store first")
    p.add_argument(
        "--train-data",
        metavar="JSONL",
        help="JSONL with the train texts (default: the file recorded at extraction, refused if it changed since)",
    )
    p.add_argument(
        "--query-data",
        metavar="JSONL",
        help="JSONL with the query texts (default: the query JSONL, or the file recorded at extraction)",
    )
    p.add_argument("--no-texts", action="store_true", help="write ids and scores only, without example texts")
    add_model_args(p, ", to extract the features of a JSONL --query")
    p.set_defaults(func=_score)
