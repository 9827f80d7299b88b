"""TracIn-CP or LESS scores over a training run's InfluenceCallback stores, as top-k per query.

    fastinfluence trajectory --method tracin --train runs/callback \
        --query 100=runs/query-100 --query 200=runs/query-200 --topk 10 --out top.json

``fastinfluence.tracin`` / ``fastinfluence.less``: each ``--query STEP=DIR`` is a store of the
query examples extracted from ``checkpoint-STEP`` (the last step of one of the callback's
intervals) with the callback's projection config and layers. LESS reads the callback's
``adam/`` stores (``InfluenceCallback(features=("adam",))``).
"""

from __future__ import annotations

from ..errors import UsageError
from .common import log, summary


def _queries(values: list[str]) -> dict:
    from ..store import FeatureStore

    out = {}
    for value in values:
        step, sep, path = value.partition("=")
        if not sep or not step.strip().isdigit() or not path:
            raise UsageError(
                f"--query {value!r}: give STEP=DIR, the checkpoint step and the query store extracted there"
            )
        if int(step) in out:
            raise UsageError(f"--query: step {int(step)} is given twice")
        out[int(step)] = FeatureStore.open(path)
    return out


def _run(args) -> int:
    from ..outputs import atomic_path, check_file
    from ..trajectory import less, tracin
    from .score import write_topk

    if args.topk is not None and args.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {args.topk}")
    out = check_file(args.out, "--out", args.overwrite)
    queries = _queries(args.query)
    method = tracin if args.method == "tracin" else less
    result = method(queries, args.train, topk=args.topk, lr=args.lr)
    with atomic_path(out) as tmp:
        write_topk(result, str(tmp), {}, {}, csv_format=out.suffix == ".csv")
    log.info(
        "wrote the %s top-%d of %d queries to %s", args.method, result.topk_values.shape[1], len(result.query_ids), out
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("trajectory", help=summary(__doc__), description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--method", choices=("tracin", "less"), default="tracin", help="TracIn-CP or LESS (default tracin)")
    p.add_argument("--train", required=True, metavar="DIR", help="the InfluenceCallback's output directory")
    p.add_argument(
        "--query",
        required=True,
        action="append",
        metavar="STEP=DIR",
        help="a query store extracted from checkpoint-STEP (repeat: one per interval)",
    )
    p.add_argument("--out", required=True, help="top-k as JSON (one object per query) or .csv")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (refused otherwise)")
    p.add_argument("--topk", type=int, default=10, help="train examples kept per query (default 10)")
    p.add_argument(
        "--lr",
        choices=("step", "interval"),
        default="step",
        help="weight each row by its own step's learning rate, or by its interval's mean (default step)",
    )
    p.set_defaults(func=_run)
