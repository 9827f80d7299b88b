"""Self-influence of every example of a feature store (its score against itself), as a .npy vector.

    fastinfluence self-influence --store runs/train --precondition kfac --out self.npy

``fastinfluence.self_influence``: <H^-1 phi_i, phi_i> per row, in store row order; high values
mark examples the model finds hard or unusual (mislabelled, poisoned, rare).
"""

from __future__ import annotations

from .. import options
from .common import log, summary, write_matrix


def _run(args) -> int:
    from ..outputs import check_file
    from ..scoring import self_influence
    from ..store import FeatureStore

    options.check_damping(args.damping)
    out = check_file(args.out, "--out", args.overwrite)
    scores = self_influence(FeatureStore.open(args.store), args.precondition, args.damping, args.chunk_rows)
    write_matrix(out, scores)
    log.info("wrote the self-influence of %d examples to %s", len(scores), out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("self-influence", help=summary(__doc__), description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--store", required=True, metavar="DIR", help="feature store directory")
    p.add_argument("--out", required=True, metavar="NPY", help="the (N,) self-influence as .npy, in store row order")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (refused otherwise)")
    p.add_argument(
        "--precondition",
        choices=options.PRECONDITIONERS,
        help="curvature fitted on the store and cached beside it (default none); kfac/ekfac need --covariances",
    )
    p.add_argument("--damping", type=float, help="absolute damping, > 0 (default 0.1 x the mean eigenvalue)")
    p.add_argument("--chunk-rows", type=int, default=8192, help="rows at a time; bounds the memory (default 8192)")
    p.set_defaults(func=_run)
