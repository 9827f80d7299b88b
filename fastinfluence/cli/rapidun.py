"""The four RapidUn score matrices (ff, fr, rf, rr) from one store of forget + retain examples.

    fastinfluence extract --model DIR --data forget_and_retain.jsonl --out runs/all
    fastinfluence rapidun-matrices --store runs/all --forget forget.jsonl --metric cosine --out runs/m
    fastinfluence weights --method rapidun --matrices runs/m --out w.json

The store's examples are both the queries and the train examples: every example is scored
against every other once (``fastinfluence.score``, with the scoring flags of ``score``), and
the (N, N) matrix is cut into ff = forget queries x forget train, fr = retain queries x forget
train, rf = forget queries x retain train and rr = retain queries x retain train, written as
DIR/ff.npy ... DIR/rr.npy in store row order. ``--forget`` names the forget examples by id: a
JSONL file whose lines' ids (their ``id`` field, else their line number, as ``extract`` numbers
them) are store ids; every other row of the store is a retain example.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import UsageError
from ..options import ScoreOptions
from .common import log, read_jsonl, summary
from .options import SCORE_FLAGS, build
from .score import add_scoring

MATRICES = ("ff", "fr", "rf", "rr")  # letters: the train set, then the query set (fr: retain queries x forget train)


def _split_rows(ids: list, forget_ids: list, source: str) -> tuple[list[int], list[int]]:
    """(forget rows, retain rows) of a store whose example ids are ``ids``."""
    row = {i: r for r, i in enumerate(ids)}
    missing = [i for i in forget_ids if i not in row]
    if missing:
        raise UsageError(
            f"--forget {source}: ids {missing[:5]} ({len(missing)} of {len(forget_ids)}) are not examples of the "
            "store; give the forget lines the ids they have in the store's data (an 'id' field in both files)"
        )
    forget = sorted(row[i] for i in set(forget_ids))
    chosen = set(forget)
    retain = [r for r in range(len(ids)) if r not in chosen]
    if not retain:
        raise UsageError(f"--forget {source} names every example of the store: RapidUn needs retain examples too")
    return forget, retain


def _run(args) -> int:
    import numpy as np

    from .. import distributed as dist
    from ..outputs import check_file, temporary
    from ..scoring import score
    from ..store import FeatureStore
    from .common import write_matrix

    options = build(ScoreOptions, args, SCORE_FLAGS, topk=1, aggregates=(), progress=not args.quiet)
    outs = {n: check_file(Path(args.out, f"{n}.npy"), "--out", args.overwrite) for n in MATRICES}
    store = FeatureStore.open(args.store)
    forget, retain = _split_rows(list(store.ids), [r["id"] for r in read_jsonl(args.forget)], args.forget)
    full = temporary(Path(args.out, "scores.npy"))
    full.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = score(store, store, dataclasses.replace(options, matrix_path=full, overwrite=True))
        if dist.rank_world()[0] == 0:
            S = result.matrix
            sets = {"f": np.asarray(forget), "r": np.asarray(retain)}
            for n in MATRICES:
                write_matrix(outs[n], np.asarray(S[np.ix_(sets[n[1]], sets[n[0]])]))
    finally:
        full.unlink(missing_ok=True)
    log.info(
        "wrote ff, fr, rf, rr of %d forget and %d retain examples (%s) to %s",
        len(forget),
        len(retain),
        options.metric,
        args.out,
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("rapidun-matrices", help=summary(__doc__), description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--store", required=True, metavar="DIR", help="feature store of the forget and retain examples")
    p.add_argument(
        "--forget",
        required=True,
        metavar="JSONL",
        help="the forget examples; their ids (the 'id' field, else the line number) are store ids",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for ff.npy, fr.npy, rf.npy, rr.npy")
    p.add_argument("--overwrite", action="store_true", help="replace the matrices in --out (refused otherwise)")
    add_scoring(p)
    p.set_defaults(func=_run)
