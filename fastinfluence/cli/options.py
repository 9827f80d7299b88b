"""The one place the command line names the library's parameters.

Each options class field has one flag here; ``add`` makes the argparse option with the
field's default (read from the dataclass, so it is defined once) and ``build`` makes the
options object from the parsed arguments. ``SPELLING`` is the same table as
``fastinfluence.errors`` reads it: while a command runs, a library error names the flag
(``--allow-incomplete``) where the API names the parameter (``allow_incomplete=True``).
"""

from __future__ import annotations

import dataclasses

SCORE_FLAGS = {
    "metric": "--metric",
    "precondition": "--precondition",
    "topk": "--topk",
    "layer_normalize": "--layer-normalize",
    "matrix_path": "--matrix",
    "chunk_rows": "--chunk-rows",
    "damping": "--damping",
    "allow_incomplete": "--allow-incomplete",
    "overwrite": "--overwrite",
}
UNLEARN_FLAGS = {
    "method": "--method",
    "alpha": "--alpha",
    "gamma": "--gamma",
    "beta": "--beta",
    "simnpo_gamma": "--simnpo-gamma",
    "delta": "--delta",
    "reduction": "--reduction",
    "weight_norm": "--weight-norm",
    "retain_loss_type": "--retain-loss-type",
    "loss_reweight_tau": "--loss-reweight-tau",
    "rapidun_tokens": "--rapidun-tokens",
    "rapidun_without_clean": "--rapidun-without-clean",
    "router_aux_loss": "--router-aux-loss",
}
PROJECTION_FLAGS = {
    "rank_in": "--rank-in",
    "rank_out": "--rank-out",
    "kind": "--kind",
    "seed": "--seed",
    "include": "--include",
    "exclude": "--exclude",
    "dtype": "--feature-dtype",
    "mode": "--mode",
    "dim": "--dim",
    "autocast": "--autocast",
}
SPELLING = {
    **SCORE_FLAGS,
    **UNLEARN_FLAGS,
    **{f"ProjectionConfig.{field}": flag for field, flag in PROJECTION_FLAGS.items()},
    "damping_ratio": "--damping-ratio",
    "max_tokens": "--max-tokens",
    "max_length": "--max-length",
    "batch_size": "--batch-size",
    "tokens": "--tokens",
    "covariances": "--covariances",
    "model": "--model",
    "layers": "--include/--exclude",
    "ProjectionConfig": "projection options (--rank-in, --rank-out, --kind, --seed, --mode, --autocast, --normalizer)",
    "GradientExtractor.extract(batches, store=...)": "fastinfluence extract --out DIR",
}


def default(cls, field: str):
    """The default of ``cls.field`` (a dataclass)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == field)


def add(parser, cls, flags: dict[str, str], field: str, help: str, **kwargs) -> None:
    """``flags[field]`` as an option of ``parser`` setting ``args.<field>``, with ``cls``'s default.

    A False boolean becomes a switch; other fields take a value (``type`` from the default
    unless given) and say their default in the help (a None default is the help's to explain).
    """
    value = default(cls, field)
    if value is False:
        parser.add_argument(flags[field], dest=field, action="store_true", help=help, **kwargs)
        return
    if "type" not in kwargs and "choices" not in kwargs and value is not None:
        kwargs["type"] = type(value)
    shown = "" if value is None else f" (default {value})"
    parser.add_argument(flags[field], dest=field, default=value, help=help + shown, **kwargs)


def build(cls, args, flags: dict[str, str], **fixed):
    """``cls`` from the parsed ``args``: the fields of ``flags`` the command has, then ``fixed``."""
    values = {field: getattr(args, field) for field in flags if hasattr(args, field)}
    return cls(**{**values, **fixed})
