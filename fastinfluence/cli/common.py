"""What the commands share: checks of flags and paths, loading a model directory, encoding JSONL.

Nothing here imports torch or transformers at module level: ``fastinfluence --help`` builds
every command's parser from these modules without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from ..data import read_jsonl  # noqa: F401  (the commands' reader; imports no torch)
from ..errors import UsageError
from ..options import AUTOCAST_DTYPES, MODES, PROJECTION_KINDS, STORAGE_DTYPES
from .options import PROJECTION_FLAGS

log = logging.getLogger("fastinfluence")


def summary(doc: str) -> str:
    """The first paragraph of a docstring on one line, without its final period (a command's help)."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split()).removesuffix(".")


# ----------------------------------------------------------------------------- checks


def positive(value: int | float, flag: str, minimum: int | float = 1) -> None:
    """Refuse ``flag`` below ``minimum`` (e.g. ``--batch-size 0``)."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the text source recorded in a store)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def device(choice: str) -> str:
    """``auto``: this rank's GPU when there is one, else cpu; a CUDA device that is absent is refused."""
    from ..distributed import resolve_device

    return resolve_device(choice)


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
        raise UsageError(
            f"{flag} {path}: no such directory; give a local Hugging Face model directory (with config.json) "
            "or a PEFT adapter directory (models are never downloaded)"
        )
    if not p.is_dir():
        raise UsageError(f"{flag} {path} is a file; give the model directory that holds config.json")
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise UsageError(
            f"{flag} {path} is not a model directory: it has neither config.json nor adapter_config.json "
            "(save one with model.save_pretrained(DIR))"
        )
    return p.resolve()


def _adapter_base(adapter: Path) -> Path:
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
    except ValueError as exc:
        raise UsageError(f"{adapter / 'adapter_config.json'} is not valid JSON ({exc})") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UsageError(
            f"{adapter / 'adapter_config.json'} names no base_model_name_or_path; set it to the base model directory"
        )
    for candidate in (Path(base), adapter / base):
        if (candidate / "config.json").exists():
            return candidate.resolve()
    raise UsageError(
        f"the adapter {adapter} was made on {base!r}, which is not a local model directory (from here or "
        f"from the adapter): set base_model_name_or_path in {adapter / 'adapter_config.json'} to its path"
    )


def _check_causal_lm(base: Path, flag: str) -> None:
    """Refuse a directory whose config names only transformers classes that are not causal LMs (a BERT
    saved as BertForMaskedLM): AutoModelForCausalLM would load it as another head, or fail later."""
    from ..lm import causal_lm_problem

    where = " (config.json 'architectures')"
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag}: {base / 'config.json'} cannot be read as JSON ({exc})") from None
    problem = causal_lm_problem(config.get("architectures") or [], config.get("model_type"), True, where)
    if problem:
        raise UsageError(f"{flag} {base} holds {problem}")


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

    from ..lm import dtype_kwargs

    root = _model_dir(path, flag)
    dtype = getattr(torch, model_dtype)
    adapter = (root / "adapter_config.json").exists()
    base = _adapter_base(root) if adapter else root
    tok_dir = next((d for d in (root, base) if any((d / f).exists() for f in TOKENIZER_FILES)), None)
    if tok_dir is None:
        raise UsageError(
            f"{flag} {path}: no tokenizer in {root}"
            + (f" or {base}" if adapter else "")
            + f" (none of {', '.join(TOKENIZER_FILES[:3])}); save it there with tokenizer.save_pretrained(DIR)"
        )
    _check_causal_lm(base, flag)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), **dtype_kwargs(dtype), local_files_only=True)
    except (SafetensorError, OSError) as exc:
        raise UsageError(_unloadable(base, flag, exc)) from None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(root), is_trainable=True, local_files_only=True)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def encode(
    tokenizer, records: list[dict], batch_size: int | None, max_length: int, eos: bool = True, **bucketing
) -> list[dict]:
    """Padded batches of JSONL records: ``fastinfluence.data.batches`` (its module docstring states the rule);
    ``bucketing``: its ``bucket`` / ``max_tokens`` / ``window`` (length-bucketed batches)."""
    from ..data import batches

    return batches(tokenizer, records, batch_size=batch_size, max_length=max_length, eos=eos, **bucketing)


def check_batches(model, batches: list[dict]) -> None:
    """Every batch checked against the model (token ids, lengths) before any store is touched."""
    import torch

    from ..batching import BatchLimits, prepare_batch

    limits, seen, warned = BatchLimits.of(model), 0, set()
    for b in batches:
        prepare_batch(b, torch.device("cpu"), seen, limits, warned)
        seen += len(b["input_ids"])


def projection_config(args):
    """ProjectionConfig from ``--config`` (JSON, or YAML with PyYAML) with command-line overrides."""
    from ..config import ProjectionConfig

    fields = [f.name for f in dataclasses.fields(ProjectionConfig)]
    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise UsageError(
                    f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give the config as JSON"
                ) from None
            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise UsageError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        else:
            try:
                values = json.loads(text)
            except ValueError as exc:
                raise UsageError(f"--config {path} is not valid JSON ({exc})") from None
        if not isinstance(values, dict):
            raise UsageError(
                f"--config {path} must hold one object of ProjectionConfig fields, got {type(values).__name__}"
            )
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UsageError(
                f"--config {path}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(fields)}"
            )
    for field in PROJECTION_FLAGS:
        if getattr(args, field, None) is not None:
            values[field] = getattr(args, field)
    return ProjectionConfig(**values)


def add_model_args(p, what: str = "") -> None:
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
    add_eos_arg(p)


def add_eos_arg(p) -> None:
    p.add_argument(
        "--no-eos",
        dest="eos",
        action="store_false",
        help="do not end each response with the tokenizer's end-of-sequence token (appended by default; see "
        "fastinfluence.data)",
    )


def check_model_args(args) -> None:
    positive(args.batch_size, "--batch-size")
    positive(args.max_length, "--max-length", 2)


def add_layer_args(p) -> None:
    """``--include`` / ``--exclude``: the ProjectionConfig fields that choose the captured layers."""
    p.add_argument(
        "--include",
        nargs="+",
        help="regexes of layer names to capture (default: a PEFT adapter's LoRA layers, else all trainable Linear "
        "layers)",
    )
    p.add_argument("--exclude", nargs="+", help="regexes of layer names to skip")


def add_projection_args(p) -> None:
    """The ProjectionConfig fields as options (None: from ``--config`` or the field's default)."""
    p.add_argument(
        "--rank-in", dest="rank_in", type=int, help="k_in, input-side projection width per layer (default 64)"
    )
    p.add_argument(
        "--rank-out", dest="rank_out", type=int, help="k_out, output-side projection width per layer (default 64)"
    )
    p.add_argument("--kind", choices=PROJECTION_KINDS, help="projection entries (default gaussian)")
    p.add_argument("--seed", type=int, help="projection seed (default 0)")
    add_layer_args(p)
    p.add_argument(
        "--feature-dtype",
        "--dtype",
        dest="dtype",
        choices=STORAGE_DTYPES,
        help="storage dtype of the features in the store (default float32); not the model's dtype (--model-dtype)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        help="factorized per-layer projection or one flat JL projection (default factorized)",
    )
    p.add_argument("--dim", type=int, help="output width of the flat mode (default 8192)")
    p.add_argument(
        "--autocast",
        choices=AUTOCAST_DTYPES,
        help="run the forward pass under torch.autocast in this dtype (a float32 model; features stay float32; "
        "features of one --autocast score only against features of the same)",
    )


def load_tensor(path: str, flag: str):
    """A score matrix or gradient tensor from ``.npy`` (as ``score --matrix`` writes it) or ``.pt``."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    if p.suffix == ".npy":
        try:
            t = torch.from_numpy(np.array(np.load(p, mmap_mode="r", allow_pickle=False)))
        except ValueError:
            raise UsageError(
                f"{flag} {path} is not a .npy array (numpy cannot read it); give the matrix "
                "`fastinfluence score --matrix` wrote"
            ) from None
    elif p.suffix in (".pt", ".pth"):
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises pickle/zip errors of many types
            raise UsageError(
                f"{flag} {path} is not a tensor saved with torch.save ({type(exc).__name__}); give a .npy or .pt tensor"
            ) from None
    else:
        raise UsageError(
            f"{flag} {path}: give a .npy or .pt tensor file (as `fastinfluence score --matrix` writes), not "
            f"{p.suffix or 'a file without extension'}"
        )
    if not isinstance(t, torch.Tensor):
        raise UsageError(f"{flag} {path} must hold one tensor, found {type(t).__name__}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise UsageError(f"{flag} {path} must hold finite float scores (dtype {t.dtype})")
    return t


def json_file(path: str, flag: str):

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path} is not valid JSON ({exc})") from None


def device_arg(args) -> str:

    return "cpu" if args.cpu else device(args.device)


def add_device(p) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto: the GPU when there is one, else cpu (default auto)",
    )
    p.add_argument("--cpu", action="store_true", help="same as --device cpu")


def write_matrix(out: Path, scores) -> None:
    """A score tensor or array as ``.npy`` at ``out``, written under a temporary name renamed when whole."""
    import numpy as np

    from ..outputs import atomic_path

    array = scores.cpu().numpy() if hasattr(scores, "cpu") else np.asarray(scores)
    with atomic_path(Path(out)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def pair_batches(args, model, tokenizer) -> tuple[list[dict], list[dict]]:
    """The ``--query`` and ``--train`` JSONL files as padded batches, checked against the model."""
    batches = [
        encode(tokenizer, read_jsonl(path), args.batch_size, args.max_length, args.eos)
        for path in (args.query, args.train)
    ]
    for b in batches:
        check_batches(model, b)
    return batches[0], batches[1]


def add_pair_args(p) -> None:
    """``--query``, ``--train``, ``--out``, ``--overwrite`` and the model and layer options of a command that
    scores two JSONL files with a model and writes the (Q, N) matrix."""
    p.add_argument("--query", required=True, metavar="JSONL", help="query examples: 'prompt' and 'response' per line")
    p.add_argument("--train", required=True, metavar="JSONL", help="train examples: 'prompt' and 'response' per line")
    p.add_argument(
        "--out",
        required=True,
        metavar="NPY",
        help="the (queries, train) score matrix as .npy; rows and columns in the files' line order",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (refused otherwise)")
    add_model_args(p)
    add_layer_args(p)
