"""Per-token scores of chosen train examples: which answer tokens carry each query's score.

    fastinfluence tokens --query runs/query --train runs/train --rows 3 17 --out tokens.json

``fastinfluence.token_scores`` over stores extracted with ``--tokens``: for each train row a
(queries x tokens) matrix whose rows sum to ``score``'s value for that (query, example) pair,
with the same metric and preconditioner. The JSON holds, per row, its id and the scores.
"""

from __future__ import annotations

import json

from .. import options
from ..errors import UsageError
from .common import log, summary


def _run(args) -> int:
    from ..outputs import atomic_path, check_file
    from ..scoring import token_scores
    from ..store import FeatureStore

    options.check_damping(args.damping)
    out = check_file(args.out, "--out", args.overwrite)
    train = FeatureStore.open(args.train)
    if not train.has_tokens:
        raise UsageError(
            f"--train {args.train} holds no per-token factors: re-run extract with --tokens into a new --out"
        )
    bad = [r for r in args.rows if not 0 <= r < len(train)]
    if bad:
        raise UsageError(f"--rows {' '.join(map(str, bad[:5]))}: outside the train store's rows 0..{len(train) - 1}")
    query = FeatureStore.open(args.query)
    scores = token_scores(query, train, args.rows, args.metric, args.precondition, args.layer_normalize, args.damping)
    body = {
        "metric": args.metric,
        "precondition": args.precondition,
        "query_ids": list(query.ids),
        "rows": [{"train_row": r, "train_id": train.ids[r], "scores": s.tolist()} for r, s in zip(args.rows, scores)],
    }
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(body))
    log.info("wrote per-token scores of %d train rows for %d queries to %s", len(args.rows), len(query), out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("tokens", help=summary(__doc__), description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--query", required=True, metavar="DIR", help="query feature store directory")
    p.add_argument("--train", required=True, metavar="DIR", help="train feature store extracted with --tokens")
    p.add_argument("--rows", required=True, type=int, nargs="+", metavar="ROW", help="train store rows to explain")
    p.add_argument("--out", required=True, metavar="JSON", help="the per-token scores as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (refused otherwise)")
    p.add_argument("--metric", choices=options.METRICS, default="dot", help="dot or cosine (default dot)")
    p.add_argument(
        "--precondition",
        choices=options.PRECONDITIONERS,
        help="curvature fitted on the train store and cached beside it (default none)",
    )
    p.add_argument("--layer-normalize", action="store_true", help="weigh each layer's block to unit norm")
    p.add_argument("--damping", type=float, help="absolute damping, > 0 (default 0.1 x the mean eigenvalue)")
    p.set_defaults(func=_run)
