"""Evaluate an (unlearned) model: perplexity, ASR, MIA AUC, privleak, forget quality.

    fastinfluence evaluate --model runs/unlearned --forget forget.jsonl --holdout holdout.jsonl \\
        --clean clean.jsonl --attack attack.json --out runs/unlearned/eval.json
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .common import add_device, add_eos_arg, device_arg, encode, json_file, load_model, positive, summary


def _evaluate(args) -> int:
    from ..data import read_jsonl
    from ..evaluate import check_attack, evaluate
    from ..outputs import check_file, write_text

    positive(args.batch_size, "--batch-size")
    positive(args.max_length, "--max-length", 2)
    if args.holdout and not args.forget:
        raise UsageError("--holdout (non-members) is compared with --forget (members): give --forget too")
    if args.retrained and not args.forget:
        raise UsageError("--retrained is compared on --forget: give --forget too")
    if not (args.clean or args.forget or args.attack):
        raise UsageError("nothing to evaluate: give --clean, --forget (with --holdout, --retrained) or --attack")
    out = check_file(args.out, "--out", args.overwrite)
    records = {flag: read_jsonl(getattr(args, flag)) for flag in ("clean", "forget", "holdout") if getattr(args, flag)}
    attack = json_file(args.attack, "--attack") if args.attack else None
    if attack is not None:
        try:
            check_attack(attack)
        except ValueError as exc:
            raise UsageError(f"--attack {args.attack}: {exc}") from None
    device = device_arg(args)
    model, tok = load_model(args.model, "float32", device)
    retrained = load_model(args.retrained, "float32", device, flag="--retrained")[0] if args.retrained else None
    batches = {k: encode(tok, r, args.batch_size, args.max_length, args.eos) for k, r in records.items()}
    stats_file = Path(args.model, "unlearn_stats.json")
    stats = None
    if stats_file.exists():
        s = json.loads(stats_file.read_text())
        stats = {"unlearn_runtime_s": s["train_runtime_s"], "unlearn_tokens": s["tokens"]}
    result = evaluate(
        model,
        clean=batches.get("clean"),
        forget=batches.get("forget"),
        holdout=batches.get("holdout"),
        tokenizer=tok,
        attack=attack,
        retrained=retrained,
        train_stats=stats,
    )
    write_text(out, json.dumps(result, indent=2, sort_keys=True))
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help=summary(__doc__),
        description="Each metric runs when its inputs are given; the result is printed and written as JSON.",
    )
    p.add_argument("--model", required=True, help="model or adapter directory (unlearn_stats.json in it is merged)")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (refused otherwise)")
    p.add_argument("--clean", help="JSONL for clean perplexity")
    p.add_argument("--forget", help="JSONL of the forget set (members)")
    p.add_argument("--holdout", help="JSONL of non-members, for MIA AUC and privleak")
    p.add_argument("--retrained", help="model retrained without the forget set, for privleak and forget quality")
    p.add_argument("--attack", help="JSON {'target': str, '<group>': [prompts], ...} for attack success rates")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per example (default 512)")
    add_eos_arg(p)
    add_device(p)
    p.set_defaults(func=_evaluate)
