"""Full-dimension K-FAC / EK-FAC influence of train examples on queries, as a .npy matrix.

    fastinfluence kfac --model DIR --query queries.jsonl --train train.jsonl --out scores.npy
    fastinfluence kfac ... --fit-data big.jsonl --save-factors ekfac.safetensors   # fit once
    fastinfluence kfac ... --factors ekfac.safetensors                              # reuse the fit

``fastinfluence.kfac_scores`` on the examples of two JSONL files: the curvature is fitted on
``--fit-data`` (default: the train examples) over the full gradients of the layers chosen by
``--include`` / ``--exclude``, without projection. The projected K-FAC of a feature store is
``fastinfluence score --precondition kfac``.
"""

from __future__ import annotations

from pathlib import Path

from .. import options
from ..errors import UsageError
from .common import (
    add_pair_args,
    check_batches,
    check_model_args,
    device,
    encode,
    load_model,
    log,
    pair_batches,
    read_jsonl,
    summary,
    write_matrix,
)


def _run(args) -> int:
    from .. import distributed as dist
    from ..config import ProjectionConfig
    from ..kfac import KFACFactors, fit_kfac, kfac_scores
    from ..outputs import atomic_path, check_file

    check_model_args(args)
    options.check_damping(args.damping)
    if args.factors and (args.save_factors or args.fit_data):
        raise UsageError("--factors are already fitted: drop --fit-data and --save-factors, or drop --factors to fit")
    if args.factors and not Path(args.factors).is_file():
        raise UsageError(f"--factors {args.factors}: no such file; write one with --save-factors FILE")
    out = check_file(args.out, "--out", args.overwrite)
    save = check_file(args.save_factors, "--save-factors", args.overwrite) if args.save_factors else None
    config = ProjectionConfig(include=args.include, exclude=args.exclude)
    model, tok = load_model(args.model, args.model_dtype, device(args.device))
    query, train = pair_batches(args, model, tok)
    fit = train
    if args.fit_data:
        fit = encode(tok, read_jsonl(args.fit_data), args.batch_size, args.max_length, args.eos)
        check_batches(model, fit)
    damping = {"damping": args.damping, "damping_ratio": args.damping_ratio}
    factors = KFACFactors.load(args.factors, **damping) if args.factors else None
    if save is not None:
        factors = fit_kfac(model, fit, args.method, config, progress=not args.quiet, **damping)
        if dist.rank_world()[0] == 0:
            with atomic_path(save) as tmp:
                factors.save(tmp)
    scores = kfac_scores(
        model,
        query,
        train,
        method=args.method,
        fit_batches=fit,
        config=config,
        metric=args.metric,
        factors=factors,
        product=args.product,
        progress=not args.quiet,
        **damping,
    )
    if dist.rank_world()[0] == 0:
        write_matrix(out, scores)
        log.info("wrote the %d x %d %s scores to %s", *scores.shape, factors.method if factors else args.method, out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("kfac", help=summary(__doc__), description=__doc__.split("\n\n", 1)[1])
    add_pair_args(p)
    p.add_argument(
        "--method",
        default="ekfac",
        choices=options.KFAC_METHODS,
        help="eigenvalue-corrected (ekfac) or plain Kronecker factors (default ekfac)",
    )
    p.add_argument("--metric", default="dot", choices=options.METRICS, help="dot product or cosine (default dot)")
    p.add_argument("--fit-data", metavar="JSONL", help="examples the curvature is fitted on (default: --train)")
    p.add_argument("--factors", metavar="FILE", help="factors fitted before (--save-factors): nothing is fitted")
    p.add_argument("--save-factors", metavar="FILE", help="also write the fitted factors here (safetensors)")
    p.add_argument(
        "--damping", type=float, help="absolute damping, > 0 (default: --damping-ratio x the mean eigenvalue)"
    )
    p.add_argument(
        "--damping-ratio", type=float, default=0.1, help="damping relative to the mean eigenvalue (default 0.1)"
    )
    p.add_argument(
        "--product",
        default="auto",
        choices=options.KFAC_PRODUCTS,
        help="how train examples are scored: dense gradients, ghost factors, or auto (default auto)",
    )
    p.set_defaults(func=_run)
