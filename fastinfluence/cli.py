"""The ``fastinfluence`` command line (also ``python -m fastinfluence``).

    fastinfluence extract --model DIR --data train.jsonl --out runs/train
    fastinfluence extract --model DIR --data queries.jsonl --out runs/query
    fastinfluence score --query runs/query --train runs/train --topk 10 --out top.csv

``extract`` and ``score`` live here; other modules plug in their subcommands: each module
in ``PLUGINS`` exposes ``register(subparsers)`` and sets ``func(args) -> int`` on its
parsers. Only the module of the command being run is imported (``--help`` and
``--version`` import neither torch nor transformers); a plugin that is not installed is
left out. Run any command under ``torchrun --nproc_per_node=N`` to split the work over N
processes.

Errors: a mistake in the input (a library ``ValueError``, ``StoreError``, a missing
file...) is one line on stderr and exit code 2; any other exception is a bug and keeps
its traceback; ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from . import __version__
from .data import read_jsonl  # noqa: F401  (the CLI's reader; imports no torch)
from .outputs import OutputError

# command -> (module that registers it, one-line help shown before the module is imported; None: the
# summary of the module's docstring, read without importing it)
PLUGINS = {
    "demo": ("fastinfluence.demo", None),
    "weights": (
        "fastinfluence.unlearn_cli",
        "per-example unlearning weights from influence scores (RapidUn, IMU, low-influence)",
    ),
    "unlearn": (
        "fastinfluence.unlearn_cli",
        "unlearn a forget set with UnlearnTrainer (GA, GradDiff, NPO, SimNPO, RapidUn)",
    ),
    "evaluate": (
        "fastinfluence.unlearn_cli",
        "evaluate an (unlearned) model: perplexity, ASR, MIA AUC, privleak, forget quality",
    ),
    "bench": ("fastinfluence.bench_cli", "time every op on each backend available here against the torch reference"),
}
log = logging.getLogger("fastinfluence")


class Registry:
    """argparse ``choices`` read from a registry (``module.attr``) when first needed.

    The names live beside the code that implements them, so a new metric, preconditioner or
    method shows up on the command line without editing it. They are read from the module's
    source (a literal tuple of names), not by importing it, so building the parser (and
    ``fastinfluence --help``) stays free of torch.
    """

    def __init__(self, module: str, attr: str):
        self.module, self.attr = module, attr
        self._cache: tuple[str, ...] | None = None

    def _names(self) -> tuple[str, ...]:
        if self._cache is None:
            import ast
            import importlib.util

            tree = ast.parse(Path(importlib.util.find_spec(self.module).origin).read_text())
            values = [
                node.value
                for node in tree.body
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == self.attr for t in node.targets)
            ]
            if len(values) != 1:
                raise RuntimeError(f"{self.module}.{self.attr} must be assigned once, as a literal tuple of names")
            self._cache = tuple(ast.literal_eval(values[0]))
        return self._cache

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


def summary(doc: str) -> str:
    """The first paragraph of a docstring on one line, without its final period (a command's help)."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split()).removesuffix(".")


def module_summary(module: str) -> str:
    """``summary`` of ``module``'s docstring, read from its source: the module itself may import torch."""
    import ast
    import importlib.util

    return summary(ast.get_docstring(ast.parse(Path(importlib.util.find_spec(module).origin).read_text())) or "")


class CLIError(ValueError):
    """A command-line input that cannot work; reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- checks


def positive(value: int | float, flag: str, minimum: int | float = 1) -> None:
    """Refuse ``flag`` below ``minimum`` (e.g. ``--batch-size 0``)."""
    if value is not None and value < minimum:
        raise CLIError(f"{flag} must be >= {minimum}, got {value}")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the text source recorded in a store)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _device(choice: str) -> str:
    """``auto``: this rank's GPU when there is one, else cpu; a CUDA device that is absent is refused."""
    from .distributed import resolve_device

    try:
        return resolve_device(choice)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ----------------------------------------------------------------------------- model and data


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)


def _model_dir(path: str, flag: str = "--model") -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(
            f"{flag} {path}: no such directory; give a local Hugging Face model directory (with config.json) "
            "or a PEFT adapter directory (models are never downloaded)"
        )
    if not p.is_dir():
        raise CLIError(f"{flag} {path} is a file; give the model directory that holds config.json")
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise CLIError(
            f"{flag} {path} is not a model directory: it has neither config.json nor adapter_config.json "
            "(save one with model.save_pretrained(DIR))"
        )
    return p.resolve()


def _adapter_base(adapter: Path) -> Path:
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
    except ValueError as exc:
        raise CLIError(f"{adapter / 'adapter_config.json'} is not valid JSON ({exc})") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise CLIError(
            f"{adapter / 'adapter_config.json'} names no base_model_name_or_path; set it to the base model directory"
        )
    for candidate in (Path(base), adapter / base):
        if (candidate / "config.json").exists():
            return candidate.resolve()
    raise CLIError(
        f"the adapter {adapter} was made on {base!r}, which is not a local model directory (from here or "
        f"from the adapter): set base_model_name_or_path in {adapter / 'adapter_config.json'} to its path"
    )


def _check_causal_lm(base: Path, flag: str) -> None:
    """Refuse a directory whose config names only transformers classes that are not causal LMs (a BERT
    saved as BertForMaskedLM): AutoModelForCausalLM would load it as another head, or fail later."""
    from .lm import causal_lm_problem

    where = " (config.json 'architectures')"
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CLIError(f"{flag}: {base / 'config.json'} cannot be read as JSON ({exc})") from None
    problem = causal_lm_problem(config.get("architectures") or [], config.get("model_type"), True, where)
    if problem:
        raise CLIError(f"{flag} {base} holds {problem}")


def _unloadable(base: Path, flag: str, exc: Exception) -> str:
    """One line for weights that transformers cannot load, naming a truncated or corrupt safetensors file."""
    from safetensors import safe_open

    for f in sorted(base.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as bad:  # safetensors raises its own error type, or OSError
            why = str(bad).partition("\n")[0]
            return f"{flag}: {f} cannot be read ({why}): the file is truncated or corrupt; copy or save the model again"
    why = str(exc).partition("\n")[0]
    return f"{flag} {base}: the model cannot be loaded ({type(exc).__name__}: {why})"


def load_model(path: str, model_dtype: str = "float32", device: str = "cpu", flag: str = "--model"):
    """(model, tokenizer) from a local HF model directory or a PEFT adapter directory (loaded trainable, so
    its LoRA layers are the captured ones). Paths are resolved, so that what is saved from the model (an
    adapter's base path) works from any directory. Nothing is downloaded."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lm import dtype_kwargs

    root = _model_dir(path, flag)
    dtype = getattr(torch, model_dtype)
    adapter = (root / "adapter_config.json").exists()
    base = _adapter_base(root) if adapter else root
    tok_dir = next((d for d in (root, base) if any((d / f).exists() for f in TOKENIZER_FILES)), None)
    if tok_dir is None:
        raise CLIError(
            f"{flag} {path}: no tokenizer in {root}"
            + (f" or {base}" if adapter else "")
            + f" (none of {', '.join(TOKENIZER_FILES[:3])}); save it there with tokenizer.save_pretrained(DIR)"
        )
    _check_causal_lm(base, flag)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), **dtype_kwargs(dtype), local_files_only=True)
    except (SafetensorError, OSError) as exc:
        raise CLIError(_unloadable(base, flag, exc)) from None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(root), is_trainable=True, local_files_only=True)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def encode(
    tokenizer, records: list[dict], batch_size: int | None, max_length: int, eos: bool = True, **bucketing
) -> list[dict]:
    """Padded batches of JSONL records: ``fastinfluence.data.batches`` (its module docstring states the rule);
    ``bucketing``: its ``bucket`` / ``max_tokens`` / ``window`` (length-bucketed batches)."""
    from .data import batches

    return batches(tokenizer, records, batch_size=batch_size, max_length=max_length, eos=eos, **bucketing)


def check_batches(model, batches: list[dict]) -> None:
    """Every batch checked against the model (token ids, lengths) before any store is touched."""
    import torch

    from .batching import BatchLimits, prepare_batch

    limits, seen, warned = BatchLimits.of(model), 0, set()
    for b in batches:
        prepare_batch(b, torch.device("cpu"), seen, limits, warned)
        seen += len(b["input_ids"])


_CONFIG_FIELDS = (
    "rank_in",
    "rank_out",
    "kind",
    "seed",
    "include",
    "exclude",
    "include_bias",
    "dtype",
    "mode",
    "dim",
    "autocast",
)


def projection_config(args):
    """ProjectionConfig from ``--config`` (JSON, or YAML with PyYAML) with command-line overrides."""
    from .config import ProjectionConfig

    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"--config {path}: no such file")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise CLIError(
                    f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give the config as JSON"
                ) from None
            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise CLIError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        else:
            try:
                values = json.loads(text)
            except ValueError as exc:
                raise CLIError(f"--config {path} is not valid JSON ({exc})") from None
        if not isinstance(values, dict):
            raise CLIError(
                f"--config {path} must hold one object of ProjectionConfig fields, got {type(values).__name__}"
            )
        unknown = sorted(set(values) - set(_CONFIG_FIELDS))
        if unknown:
            raise CLIError(
                f"--config {path}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_CONFIG_FIELDS)}"
            )
    for field, dest in (
        ("rank_in",) * 2,
        ("rank_out",) * 2,
        ("kind",) * 2,
        ("seed",) * 2,
        ("include",) * 2,
        ("exclude",) * 2,
        ("dtype", "feature_dtype"),
        ("mode",) * 2,
        ("dim",) * 2,
        ("autocast",) * 2,
    ):
        if getattr(args, dest, None) is not None:
            values[field] = getattr(args, dest)
    return ProjectionConfig(**values)


def _add_model_args(p, what: str = "") -> None:
    p.add_argument(
        "--model",
        required=not what,
        metavar="DIR",
        help=f"local Hugging Face model directory, or a PEFT adapter directory{what} (its base model is loaded from "
        f"the path in adapter_config.json; nothing is downloaded)",
    )
    p.add_argument(
        "--model-dtype",
        "--torch-dtype",
        dest="model_dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype the model is loaded in (default float32); not the features' storage dtype "
        "(extract --feature-dtype)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto: this rank's GPU when there is one, else cpu (default auto)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward (default 8)")
    p.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="tokens kept per example, prompt + response; longer prompts lose their start, the answer is kept "
        "(default 512)",
    )
    p.add_argument(
        "--no-eos",
        dest="eos",
        action="store_false",
        help="do not end each response with the tokenizer's end-of-sequence token (appended by default; see "
        "fastinfluence.data)",
    )


def _check_model_args(args) -> None:
    positive(args.batch_size, "--batch-size")
    positive(args.max_length, "--max-length", 2)


# ----------------------------------------------------------------------------- extract


def _store_out(path: str) -> Path:
    """``extract --out``: a new directory, or a store to resume or extend; never another directory
    (the library's own check, which ``GradientExtractor.extract(store=)`` applies too)."""
    from .outputs import OutputError, check_store_dir

    try:
        return check_store_dir(path, "--out")
    except OutputError as exc:
        raise CLIError(str(exc)) from None


def _bucketing(args) -> dict:
    """``extract``'s length-bucketing options as ``data.batches`` keywords; resolves ``--batch-size``
    (default 8, or no limit under a ``--max-tokens`` budget)."""
    positive(args.max_tokens, "--max-tokens", 2)
    positive(args.bucket_window, "--bucket-window")
    if args.bucket_window is not None and not (args.bucket or args.max_tokens):
        raise CLIError("--bucket-window applies to length-bucketed batches: add --bucket or --max-tokens")
    if args.batch_size is None:
        args.batch_size = None if args.max_tokens else 8
    if not (args.bucket or args.max_tokens):
        return {}
    return {"bucket": True, "max_tokens": args.max_tokens, "window": args.bucket_window or 1024}


def _extract(args) -> int:
    from . import distributed as dist
    from .extract import GradientExtractor
    from .store import write_store

    bucketing = _bucketing(args)
    _check_model_args(args)
    positive(args.shard_rows, "--shard-rows")
    out = _store_out(args.out)
    if args.normalizer is not None and not Path(args.normalizer).is_file():
        raise CLIError(f"--normalizer {args.normalizer}: no such file; write one with fastinfluence.Normalizer.save")
    records = read_jsonl(args.data)
    config = projection_config(args)
    model, tok = load_model(args.model, args.model_dtype, _device(args.device))
    extractor = GradientExtractor(model, config, normalizer=args.normalizer)
    try:
        batches = encode(tok, records, args.batch_size, args.max_length, args.eos, **bucketing)
    except ValueError as exc:
        if "max_tokens" not in str(exc):
            raise
        msg = str(exc).replace("max_tokens=", "--max-tokens ").replace("raise max_tokens", "raise --max-tokens")
        raise CLIError(msg.replace("lower max_length", "lower --max-length")) from None
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


def _register_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="extract per-example gradient features of a JSONL data set into a feature store",
        description="Extract projected per-example gradient features into an on-disk FeatureStore. "
        "Running it again on the same --out resumes an interrupted run; a --data file that extends the "
        "old one appends the new examples. Examples are encoded by fastinfluence.data: prompt tokens are "
        "context (label -100), response tokens + end-of-sequence are the answer.",
    )
    _add_model_args(p)
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
    p.add_argument(
        "--rank-in", dest="rank_in", type=int, help="k_in, input-side projection width per layer (default 64)"
    )
    p.add_argument(
        "--rank-out", dest="rank_out", type=int, help="k_out, output-side projection width per layer (default 64)"
    )
    p.add_argument(
        "--kind", choices=Registry("fastinfluence.config", "KINDS"), help="projection entries (default gaussian)"
    )
    p.add_argument("--seed", type=int, help="projection seed (default 0)")
    p.add_argument(
        "--include",
        nargs="+",
        help="regexes of layer names to capture (default: a PEFT adapter's LoRA layers, else all trainable Linear "
        "layers)",
    )
    p.add_argument("--exclude", nargs="+", help="regexes of layer names to skip")
    p.add_argument(
        "--feature-dtype",
        "--dtype",
        dest="feature_dtype",
        choices=Registry("fastinfluence.config", "STORAGE_DTYPES"),
        help="storage dtype of the features in the store (default float32); not the model's dtype (--model-dtype)",
    )
    p.add_argument(
        "--mode",
        choices=Registry("fastinfluence.config", "MODES"),
        help="factorized per-layer projection or one flat JL projection (default factorized)",
    )
    p.add_argument("--dim", type=int, help="output width of the flat mode (default 8192)")
    p.add_argument(
        "--autocast",
        choices=Registry("fastinfluence.config", "AUTOCAST_DTYPES"),
        help="run the forward pass under torch.autocast in this dtype (a float32 model; features stay float32; "
        "features of one --autocast score only against features of the same)",
    )
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


# ----------------------------------------------------------------------------- score


def _texts(path: str | None, digest: str | None, flag: str, explicit: bool) -> dict:
    """id -> record of the texts file.

    A file that changed since extraction is refused (or, given explicitly, warned about).
    """
    if not path:
        return {}
    if not Path(path).is_file():
        if explicit:
            raise CLIError(f"{flag} {path}: no such file")
        raise CLIError(
            f"the texts of the store's examples were read from {path}, which is gone: give {flag} FILE "
            "with the same examples, or --no-texts to write the scores without texts"
        )
    if digest is not None and file_digest(path) != digest:
        if not explicit:
            raise CLIError(
                f"{path} changed since the store was extracted from it (its SHA-256 differs), so its texts "
                f"may not be the store's examples: give {flag} FILE with the original examples, or --no-texts"
            )
        log.warning("%s %s differs from the file the store was extracted from; its texts are matched by id", flag, path)
    return {r["id"]: r for r in read_jsonl(path)}


def _check_texts(table: dict, ids, flag: str, path) -> None:
    missing = [i for i in ids if i not in table]
    if table and missing:
        raise CLIError(
            f"{path} has no example with ids {missing[:5]} (of {len(missing)} scored ones): give {flag} "
            "with the file the store was extracted from, or --no-texts"
        )


def _score(args) -> int:
    from . import distributed as dist
    from .outputs import atomic_path, check_file
    from .store import FeatureStore

    positive(args.topk, "--topk")
    positive(args.chunk_rows, "--chunk-rows")
    if args.damping is not None and not args.damping > 0:
        raise CLIError(
            f"--damping must be > 0, got {args.damping}: zero or negative damping flips the scores' signs and order"
        )
    out = check_file(args.out, "--out", args.overwrite)
    train = FeatureStore.open(args.train)
    if args.precondition in ("kfac", "ekfac") and not train.has_covariances:
        raise CLIError(
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
            raise CLIError(
                "--query is a JSONL file: give --model to extract its features (with the train store's projection "
                "config)"
            )
        _check_model_args(args)
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
    train_texts = (
        _texts(
            args.train_data or train.meta.get("data"),
            None if args.train_data else train.meta.get("data_sha256"),
            "--train-data",
            bool(args.train_data),
        )
        if texts
        else {}
    )
    if jsonl_query:
        query_texts = {r["id"]: r for r in query_records} if texts else {}
        query = _query_features(args, train, query_records)
    else:
        query_texts = (
            _texts(
                args.query_data or query.meta.get("data"),
                None if args.query_data else query.meta.get("data_sha256"),
                "--query-data",
                bool(args.query_data),
            )
            if texts
            else {}
        )
    _check_texts(train_texts, train.ids, "--train-data", args.train_data or train.meta.get("data"))
    _check_texts(query_texts, query.ids, "--query-data", args.query_data or args.query)
    result = _run_score(args, query, train, matrix)
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
    from .config import ProjectionConfig
    from .extract import GradientExtractor
    from .store.format import check_same_origin

    model, tok = load_model(args.model, args.model_dtype, _device(args.device))
    extractor = GradientExtractor(model, ProjectionConfig.from_dict(train.manifest["config"]))
    # Before any query is extracted: features of another model would only be refused when scored.
    check_same_origin(extractor.metadata(), train.metadata(), f"--model {args.model}", f"the train store {args.train}")
    batches = encode(tok, records, args.batch_size, args.max_length, args.eos)
    check_batches(model, batches)
    return extractor.extract(batches)


def _run_score(args, query, train, matrix: Path | None):
    """``score``; the library writes the matrix under a temporary name and renames it when whole
    (``--overwrite`` was applied when the paths were checked)."""
    from .scoring import score

    return score(
        query,
        train,
        metric=args.metric,
        precondition=args.precondition,
        topk=args.topk,
        layer_normalize=args.layer_normalize,
        matrix_path=matrix,
        overwrite=True,
        chunk_rows=args.chunk_rows,
        damping=args.damping,
        progress=not args.quiet,
        allow_incomplete=args.allow_incomplete,
    )


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


def _register_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score queries against a train feature store and write the top-k with example texts",
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
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out / --matrix when they exist (refused otherwise)"
    )
    p.add_argument(
        "--metric",
        default="dot",
        choices=Registry("fastinfluence.scoring", "METRICS"),
        help="dot product or cosine of the (preconditioned) features (default dot)",
    )
    p.add_argument(
        "--precondition",
        default=None,
        choices=Registry("fastinfluence.precondition", "KINDS"),
        help="curvature fitted on the train store and cached beside it (default none); kfac/ekfac need a store "
        "extracted with --covariances",
    )
    p.add_argument(
        "--damping", type=float, help="absolute damping of the preconditioner, > 0 (default 0.1 x its mean eigenvalue)"
    )
    p.add_argument("--topk", type=int, default=10, help="train examples kept per query (default 10)")
    p.add_argument(
        "--layer-normalize", action="store_true", help="scale each layer's features to unit norm before summing layers"
    )
    p.add_argument(
        "--chunk-rows", type=int, default=8192, help="train rows scored at a time; bounds the memory (default 8192)"
    )
    p.add_argument(
        "--matrix",
        metavar="NPY",
        help="also write the full query x train score matrix to this .npy file (memory-mapped; free space is checked "
        "first)",
    )
    p.add_argument("--verify", action="store_true", help="check every shard checksum of the train store first")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="score the rows of a store whose extraction was interrupted (refused otherwise: resume the extraction)",
    )
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
    _add_model_args(p, ", to extract the features of a JSONL --query")
    p.set_defaults(func=_score)


# ----------------------------------------------------------------------------- program


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser. ``command``: the plugin command whose module is imported (``"*"``: all of them;
    None: none, the others appear with their one-line help only)."""
    parser = argparse.ArgumentParser(
        prog="fastinfluence",
        description=(
            "Fast, low-memory influence estimation and influence-guided unlearning for Hugging Face causal LMs."
        ),
        epilog="examples:\n"
        "  fastinfluence extract --model DIR --data train.jsonl --out runs/train --covariances\n"
        "  fastinfluence extract --model DIR --data queries.jsonl --out runs/query\n"
        "  fastinfluence score --query runs/query --train runs/train --precondition kfac --topk 10 --out top.csv\n"
        "  torchrun --nproc_per_node=2 -m fastinfluence extract ...   (ranks split the examples)\n"
        "'fastinfluence COMMAND --help' explains every option of a command. Errors in the input are one line\n"
        "on stderr with exit code 2; --debug shows their traceback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastinfluence {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default INFO)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, no loading messages or warnings of transformers (anywhere on the line)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of every error (anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _register_extract(sub)
    _register_score(sub)
    modules = (
        {m for m, _ in PLUGINS.values()} if command == "*" else {PLUGINS[command][0]} if command in PLUGINS else set()
    )
    for module in sorted(modules):
        _plug(module, sub)
    for name, (module, help) in PLUGINS.items():
        if name not in sub.choices and module not in modules:
            sub.add_parser(name, help=help or module_summary(module), add_help=False)
    return parser


def _plug(module: str, sub) -> None:
    """Add the subcommands of ``module``; one that is absent or broken is left out (with a warning when broken)."""
    try:
        importlib.import_module(module).register(sub)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            log.warning("the commands of %s are unavailable: %s", module, exc)
    except Exception as exc:  # a broken plugin must not take the other commands down
        log.warning("the commands of %s are unavailable: %s: %s", module, type(exc).__name__, exc)


_GLOBAL_FLAGS = ("--quiet", "--debug")


def _command_of(argv: list[str]) -> str | None:
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--log-level":
            skip = True
        elif a == "--":
            return None
        elif not a.startswith("-"):
            return a
    return None


def _quiet() -> None:
    """Silence transformers' and huggingface_hub's loading bars and warnings, and Python warnings."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# Library wording -> command-line wording, applied to the one-line messages.
_CLI_TERMS = [
    (r"GradientExtractor\.extract\(batches, store=\.\.\.\)", "fastinfluence extract --out DIR"),
    (
        r"extract both with the same model, layers and ProjectionConfig",
        "extract both with the same --model, --include/--exclude and projection options (--rank-in, --rank-out, "
        "--kind, --seed, --mode, --autocast, --normalizer)",
    ),
    (r"extract with tokens=True", "extract with --tokens"),
    (r"extract with covariances=True", "extract with --covariances"),
    (
        r"was extracted with tokens=(\w+), covariances=(\w+); pass the same flags to resume or extend it "
        r"\(got tokens=(\w+), covariances=(\w+)\)",
        lambda m: (
            f"was extracted with {_flags(m.group(1), m.group(2))}; pass the same flags to resume or extend it "
            f"(this command has {_flags(m.group(3), m.group(4))})"
        ),
    ),
    (r"allow_incomplete=True", "--allow-incomplete"),
    (r"overwrite=True", "--overwrite"),
    (r"ProjectionConfig\(include=\.\.\., exclude=\.\.\.\)", "--include / --exclude"),
    (r"ProjectionConfig\(include=\.\.\.\)", "--include"),
    (r"ProjectionConfig\.mode='factorized'", "--mode factorized"),
    (r"ProjectionConfig\.dtype", "--feature-dtype"),
    (r"ProjectionConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-")),
    (r"\bmax_length\b", "--max-length"),
    (r"\bbatch_size\b", "--batch-size"),
    (r"(?<!-)\bdamping\b(?= must)", "--damping"),
    (r"matrix_path=", "--matrix"),
]


def _flags(tokens: str, covariances: str) -> str:
    named = [f for f, v in (("--tokens", tokens), ("--covariances", covariances)) if v == "True"]
    return " ".join(named) if named else "neither --tokens nor --covariances"


def cli_terms(message: str) -> str:
    for pattern, repl in _CLI_TERMS:
        message = re.sub(pattern, repl, message)
    return message


def _user_error(exc: BaseException) -> str | None:
    """The one-line message of an input mistake, or None for a bug (which keeps its traceback)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return (
            f"this needs the package {exc.name.split('.')[0]}, which is not installed: pip install "
            f"{exc.name.split('.')[0]}"
        )
    if isinstance(exc, OSError) and not isinstance(exc, OutputError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}:{where}" if exc.strerror else str(exc)
    if isinstance(exc, (ValueError, FloatingPointError)) or names & {"StoreError", "MismatchError"}:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _shutdown() -> None:
    """Tear the process group down (torchrun), so that no rank exits with a live communicator."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet, debug = "--quiet" in argv, "--debug" in argv
    argv = [a for a in argv if a not in _GLOBAL_FLAGS]
    if quiet:
        _quiet()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(_command_of(argv)).parse_args(argv)
    args.quiet, args.debug = quiet, debug
    logging.getLogger("fastinfluence").setLevel("WARNING" if quiet and args.log_level == "INFO" else args.log_level)
    if not hasattr(args, "func"):  # a plugin that could not be loaded (its warning was logged)
        print(f"fastinfluence: error: the command {args.command!r} is unavailable here", file=sys.stderr)
        return 2
    try:
        from . import distributed as dist

        dist.init_from_env()
        if quiet:
            _quiet()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fastinfluence {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = None if debug else _user_error(exc)
        if message is None:
            raise
        print(f"fastinfluence {args.command}: error: {cli_terms(message)}", file=sys.stderr)
        return 2
    finally:
        _shutdown()


if __name__ == "__main__":
    sys.exit(main())
