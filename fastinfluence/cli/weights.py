"""Per-example unlearning weights from influence scores (RapidUn, IMU, low-influence).

    fastinfluence weights --method rapidun --matrices runs/m --out w.json
    fastinfluence weights --method rapidun --ff ff.npy --fr fr.npy --rf rf.npy --rr rr.npy --out w.json

Score matrices are ``.npy`` (as ``fastinfluence score --matrix`` and ``rapidun-matrices``
write them) or ``.pt``. The weights file is JSON, read by ``fastinfluence unlearn --weights``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..options import RAPIDUN_AGGREGATES
from .common import load_tensor, log, summary


def _rapidun_matrices(args) -> list:
    """ff, fr, rf, rr from ``--matrices DIR`` (``rapidun-matrices --out``) or from ``--ff`` ... ``--rr``."""
    from .rapidun import MATRICES

    given = [n for n in MATRICES if getattr(args, n) is not None]
    if args.matrices is not None:
        if given:
            raise UsageError(f"give --matrices or --{' --'.join(given)}, not both")
        return [load_tensor(str(Path(args.matrices, f"{n}.npy")), f"--matrices {args.matrices}:") for n in MATRICES]
    missing = [n for n in MATRICES if n not in given]
    if missing:
        raise UsageError(
            f"--method rapidun needs --{' --'.join(missing)} (or --matrices DIR, as `fastinfluence rapidun-matrices` "
            "writes it)"
        )
    return [load_tensor(getattr(args, n), f"--{n}") for n in MATRICES]


def _weights(args) -> int:
    from .. import weights
    from ..outputs import check_file

    out_path = check_file(args.out, "--out", args.overwrite)

    if args.method == "rapidun":
        w = weights.rapidun(
            *_rapidun_matrices(args),
            tau_f=args.tau_f,
            tau_r=args.tau_r,
            w_min=args.w_min,
            w_max=args.w_max,
            aggregate=args.aggregate,
            topk=args.topk,
            rows="queries",  # the (Q, N) matrices `fastinfluence score --matrix` and rapidun-matrices write
        )
        out = {"method": "rapidun", "forget": w.forget.tolist(), "retain": w.retain.tolist()}
    elif args.method == "imu":
        if args.forget_grads is None:
            raise UsageError("--method imu needs --forget-grads (an (N, D) .npy/.pt of LM-head gradients)")
        retain = load_tensor(args.retain_grads, "--retain-grads") if args.retain_grads else None
        w = weights.imu(load_tensor(args.forget_grads, "--forget-grads"), retain, keep_fraction=args.keep_fraction)
        out = {"method": "imu", "forget": w.weights.tolist(), "influence": w.influence.tolist()}
    else:
        if args.scores is None:
            raise UsageError("--method low_influence needs --scores (a (Q, N) or (N,) .npy/.pt)")
        r = weights.low_influence(
            load_tensor(args.scores, "--scores"), quantile=args.quantile, threshold=args.threshold, rows="queries"
        )
        out = {
            "method": "low_influence",
            "n": len(r.skip),
            "keep": r.keep.tolist(),
            "threshold": r.threshold,
            "compute_saved": r.compute_saved,
        }
    handoff = weights.unlearn_weights(*(out.pop(k, None) for k in ("forget", "retain", "keep", "n")))
    weights.save_weights(out_path, handoff, **out)
    log.info("wrote %s weights to %s", args.method, args.out)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "weights",
        help=summary(__doc__),
        description="Turn score matrices or gradients into per-example weights, written as JSON.",
    )
    p.add_argument("--method", required=True, choices=["rapidun", "imu", "low_influence"])
    p.add_argument(
        "--out",
        required=True,
        help="JSON output: {'forget': [...], 'retain': [...]} (rapidun), {'forget', 'influence'} (imu), {'keep', "
        "...} (low_influence)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (refused otherwise)")
    p.add_argument(
        "--matrices",
        metavar="DIR",
        help="rapidun: the directory of ff.npy, fr.npy, rf.npy, rr.npy that `fastinfluence rapidun-matrices` wrote",
    )
    for n, what in (
        ("ff", "forget queries x forget train"),
        ("fr", "retain queries x forget train"),
        ("rf", "forget queries x retain train"),
        ("rr", "retain queries x retain train"),
    ):
        p.add_argument(f"--{n}", help=f"rapidun: (Q, N) score matrix, {what} (.npy or .pt)")
    p.add_argument("--tau-f", type=float, default=0.7, help="rapidun forget temperature (default 0.7)")
    p.add_argument("--tau-r", type=float, default=1.2, help="rapidun retain temperature (default 1.2)")
    p.add_argument(
        "--w-min", type=float, default=0.2, help="rapidun smallest weight before normalisation (default 0.2)"
    )
    p.add_argument("--w-max", type=float, default=3.0, help="rapidun largest weight before normalisation (default 3)")
    p.add_argument(
        "--aggregate",
        default="mean",
        choices=RAPIDUN_AGGREGATES,
        help="rapidun: per train example, mean over queries or RapidUn's top-k then median (default mean)",
    )
    p.add_argument("--topk", type=int, help="rapidun topk_median: scores kept per query (default all)")
    p.add_argument("--forget-grads", help="imu: (Nf, D) LM-head gradients of the forget set (.npy or .pt)")
    p.add_argument("--retain-grads", help="imu: (Nr, D) gradients also used for the Fisher (optional)")
    p.add_argument(
        "--keep-fraction", type=float, default=1.0, help="imu: fraction of negative-influence examples kept (default 1)"
    )
    p.add_argument("--scores", help="low_influence: (Q, N) or (N,) scores (.npy or .pt)")
    p.add_argument("--quantile", type=float, help="low_influence: skip |score| at or below this quantile")
    p.add_argument("--threshold", type=float, help="low_influence: skip |score| at or below this value")
    p.set_defaults(func=_weights)
