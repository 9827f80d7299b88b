"""Extract per-example gradient features of a JSONL data set into a feature store.

fastinfluence extract --model DIR --data train.jsonl --out runs/train --covariances
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .common import (
    add_model_args,
    add_projection_args,
    check_batches,
    check_model_args,
    device,
    encode,
    file_digest,
    load_model,
    log,
    positive,
    projection_config,
    read_jsonl,
    summary,
)


def _store_out(path: str) -> Path:
    """``extract --out``: a new directory, or a store to resume or extend; never another directory
    (the library's own check, which ``GradientExtractor.extract(store=)`` applies too)."""
    from ..outputs import check_store_dir

    return check_store_dir(path, "--out")


def _bucketing(args) -> dict:
    """``extract``'s length-bucketing options as ``data.batches`` keywords; resolves ``--batch-size``
    (default 8, or no limit under a ``--max-tokens`` budget)."""
    positive(args.max_tokens, "--max-tokens", 2)
    positive(args.bucket_window, "--bucket-window")
    if args.bucket_window is not None and not (args.bucket or args.max_tokens):
        raise UsageError("--bucket-window applies to length-bucketed batches: add --bucket or --max-tokens")
    if args.batch_size is None:
        args.batch_size = None if args.max_tokens else 8
    if not (args.bucket or args.max_tokens):
        return {}
    return {"bucket": True, "max_tokens": args.max_tokens, "window": args.bucket_window or 1024}


def _extract(args) -> int:
    from .. import distributed as dist
    from ..extract import GradientExtractor
    from ..store import write_store

    bucketing = _bucketing(args)
    check_model_args(args)
    positive(args.shard_rows, "--shard-rows")
    out = _store_out(args.out)
    if args.normalizer is not None and not Path(args.normalizer).is_file():
        raise UsageError(f"--normalizer {args.normalizer}: no such file; write one with fastinfluence.Normalizer.save")
    records = read_jsonl(args.data)
    config = projection_config(args)
    model, tok = load_model(args.model, args.model_dtype, device(args.device))
    extractor = GradientExtractor(model, config, normalizer=args.normalizer)
    batches = encode(tok, records, args.batch_size, args.max_length, args.eos, **bucketing)
    check_batches(model, batches)
    meta = {
        "data": str(Path(args.data).resolve()),
        "data_sha256": file_digest(args.data),
        "model": str(Path(args.model).resolve()),
        "encoding": {"max_length": args.max_length, "eos": args.eos},
        "batching": {"batch_size": args.batch_size, **bucketing},
    }
    store = write_store(
        out,
        extractor,
        batches,
        tokens=args.tokens,
        covariances=args.covariances,
        shard_rows=args.shard_rows,
        meta=meta,
        progress=not args.quiet,
    )
    if dist.rank_world()[0] == 0:
        log.info(
            "store %s: %d rows of %d features in %d shards", store.path, store.num_rows, store.dim, len(store.shards)
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "extract",
        help=summary(__doc__),
        description="Extract projected per-example gradient features into an on-disk FeatureStore. "
        "Running it again on the same --out resumes an interrupted run; a --data file that extends the "
        "old one appends the new examples. Examples are encoded by fastinfluence.data: prompt tokens are "
        "context (label -100), response tokens + end-of-sequence are the answer.",
    )
    add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="JSONL",
        help="JSONL file, one example per line with 'prompt' and 'response' (and optional 'id'); the loss is taken "
        "on the response tokens",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="feature store directory (created, resumed or extended)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="ProjectionConfig as a JSON or YAML file; the options below override its fields",
    )
    add_projection_args(p)
    p.add_argument(
        "--normalizer",
        metavar="FILE",
        help="a saved fastinfluence.Normalizer (Normalizer.save): scale each layer's gradient by the optimizer's "
        "second moments before projection (TrackStar); extract queries with the same file",
    )
    p.add_argument("--tokens", action="store_true", help="also store per-token factors (for per-token scores)")
    p.add_argument(
        "--covariances",
        action="store_true",
        help="also store activation/gradient covariance sums (for kfac/ekfac preconditioning)",
    )
    p.add_argument("--shard-rows", type=int, default=4096, help="rows per shard file (default 4096)")
    p.add_argument(
        "--bucket",
        action="store_true",
        help="batch examples of similar length together (sorted longest first within windows of --bucket-window "
        "examples) so that little compute goes to padding; the store keeps the data order",
    )
    p.add_argument(
        "--max-tokens",
        dest="max_tokens",
        type=int,
        metavar="N",
        help="length-bucketed batches of at most N padded tokens (examples x longest) each; implies --bucket, and "
        "--batch-size then caps examples per batch only when given",
    )
    p.add_argument(
        "--bucket-window",
        dest="bucket_window",
        type=int,
        metavar="N",
        help="examples sorted by length together (default 1024); their features are held until the window is done",
    )
    p.set_defaults(func=_extract, batch_size=None)
