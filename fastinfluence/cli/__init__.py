"""The ``fastinfluence`` command line (also ``python -m fastinfluence``).

    fastinfluence extract --model DIR --data train.jsonl --out runs/train
    fastinfluence extract --model DIR --data queries.jsonl --out runs/query
    fastinfluence score --query runs/query --train runs/train --topk 10 --out top.csv

One module per command in this package, each with ``register(subparsers)`` (its one-line
help is the first paragraph of its docstring) and a ``func(args) -> int`` on its parser.
The modules import neither torch nor transformers until a command runs, so ``--help`` is
fast. The scoring and unlearning flags are fields of the API's options classes
(``fastinfluence.options``), mapped to flags in ``cli.options``. Run any command under
``torchrun --nproc_per_node=N`` to split the work over N processes.

Errors: a mistake in the input (a ``fastinfluence.errors.FastInfluenceError``, any other
``ValueError`` of the library, a missing file...) is one line on stderr and exit code 2;
the library names the flags in it (``errors.spelled_as``). Any other exception is a bug and
keeps its traceback; ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import spelled_as
from . import bench, demo, evaluate, exact, extract, kfac, rapidun, score, self_influence, unlearn, weights
from .options import SPELLING

COMMANDS = (extract, score, self_influence, exact, kfac, rapidun, weights, unlearn, evaluate, bench, demo)
log = logging.getLogger("fastinfluence")


def build_parser() -> argparse.ArgumentParser:
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
    for command in COMMANDS:
        command.register(sub)
    return parser


_GLOBAL_FLAGS = ("--quiet", "--debug")


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


def _user_error(exc: BaseException) -> str | None:
    """The one-line message of an input mistake, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        package = exc.name.split(".")[0]
        return f"this needs the package {package}, which is not installed: pip install {package}"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}:{where}" if exc.strerror else str(exc)
    if isinstance(exc, (ValueError, FloatingPointError)):  # FastInfluenceError and the library's other checks
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
    args = build_parser().parse_args(argv)
    args.quiet, args.debug = quiet, debug
    logging.getLogger("fastinfluence").setLevel("WARNING" if quiet and args.log_level == "INFO" else args.log_level)
    try:
        from .. import distributed as dist

        dist.init_from_env()
        if quiet:
            _quiet()
        with spelled_as(SPELLING):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fastinfluence {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = None if debug else _user_error(exc)
        if message is None:
            raise
        print(f"fastinfluence {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        _shutdown()


if __name__ == "__main__":
    sys.exit(main())
