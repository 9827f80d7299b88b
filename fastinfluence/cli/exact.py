"""Exact query x train gradient inner products of a model (no projection), as a .npy matrix.

    fastinfluence exact --model DIR --query queries.jsonl --train train.jsonl --out scores.npy

``fastinfluence.exact_scores`` on the examples of two JSONL files: per layer the cheaper of
the ghost and dense methods (``--method``), summed over the layers chosen by ``--include`` /
``--exclude``. The gold standard that projected scores approximate; for small sets.
"""

from __future__ import annotations

from .. import options
from .common import add_pair_args, check_model_args, device, load_model, log, pair_batches, summary, write_matrix


def _run(args) -> int:
    from .. import distributed as dist
    from ..config import ProjectionConfig
    from ..exact import exact_scores
    from ..outputs import check_file

    check_model_args(args)
    out = check_file(args.out, "--out", args.overwrite)
    config = ProjectionConfig(include=args.include, exclude=args.exclude, autocast=args.autocast)
    model, tok = load_model(args.model, args.model_dtype, device(args.device))
    query, train = pair_batches(args, model, tok)
    scores = exact_scores(model, query, train, config, metric=args.metric, method=args.method, progress=not args.quiet)
    if dist.rank_world()[0] == 0:
        write_matrix(out, scores)
        log.info("wrote the %d x %d exact %s scores to %s", *scores.shape, args.metric, out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("exact", help=summary(__doc__), description=__doc__.split("\n\n", 1)[1])
    add_pair_args(p)
    p.add_argument("--metric", default="dot", choices=options.METRICS, help="dot product or cosine (default dot)")
    p.add_argument(
        "--method",
        default="auto",
        choices=options.EXACT_METHODS,
        help="ghost (from per-token factors), dense (per-example gradients) or auto: the cheaper per layer "
        "(default auto)",
    )
    p.add_argument(
        "--autocast",
        choices=options.AUTOCAST_DTYPES,
        help="run the forward pass under torch.autocast in this dtype (a float32 model)",
    )
    p.set_defaults(func=_run)
