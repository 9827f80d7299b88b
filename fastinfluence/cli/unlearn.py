"""Unlearn a forget set with UnlearnTrainer (GA, GradDiff, NPO, SimNPO, RapidUn).

    fastinfluence unlearn --model DIR --forget forget.jsonl --retain retain.jsonl --weights w.json \\
        --method rapidun --lora-r 16 --out runs/unlearned

Data files are JSONL with ``prompt`` and ``response`` (forget lines may add
``clean_response``, the answer RapidUn trains towards). The method and loss flags are
``UnlearnOptions`` fields (``fastinfluence.options``), with its defaults.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import UsageError
from ..options import METHODS, RAPIDUN_TOKENS, REDUCTIONS, RETAIN_LOSS_TYPES, WEIGHT_NORMS, UnlearnOptions
from .common import add_device, add_eos_arg, device_arg, load_model, log, positive, summary
from .options import UNLEARN_FLAGS, add, build


def examples_from_jsonl(tokenizer, path: str, max_length: int, eos: bool = True) -> list[dict]:
    """UnlearnDataset examples, encoded by ``fastinfluence.data`` (prompt tokens -100, response + eos the answer);
    a line's ``clean_response`` becomes the example's ``clean`` encoding."""
    from ..data import encode, read_jsonl

    out = []
    for e in encode(tokenizer, read_jsonl(path), max_length, eos, fields=("clean_response",)):
        ex = {"input_ids": e["input_ids"], "labels": e["labels"]}
        if "clean_response" in e:
            ex["clean"] = e["clean_response"]
        out.append(ex)
    return out


def _load_weights(
    path: str | None, forget: list[dict], n_retain: int | None
) -> tuple[list[dict], list | None, list | None]:
    """(forget examples kept, forget weights, retain weights) from the ``--weights`` file (None: no weights).

    The one place the command reads a weights file (``fastinfluence weights`` writes it, through
    :func:`fastinfluence.weights.save_weights`); skipped (low-influence) forget examples are dropped,
    the meaning :mod:`fastinfluence.weights` gives them everywhere."""
    if path is None:
        return forget, None, None
    from ..weights import load_weights

    try:
        keep, fw, rw = load_weights(path).select(len(forget), n_retain, f"--weights {path}")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--weights: {exc}" if isinstance(exc, OSError) else str(exc)) from None
    if len(keep) < len(forget):
        log.info("low-influence skipping: %d of %d forget examples kept", len(keep), len(forget))
    return [forget[i] for i in keep], fw, rw


def _unlearn(args) -> int:
    from ..data import read_jsonl
    from ..outputs import check_dir

    for flag, v in (
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--logging-steps", args.logging_steps),
    ):
        positive(v, flag)
    positive(args.max_length, "--max-length", 2)
    positive(args.ratio, "--ratio", 0)
    positive(args.steps, "--steps", 0)
    positive(args.lora_r, "--lora-r", 0)
    if not args.lr > 0 or not args.epochs > 0:
        raise UsageError(f"--lr and --epochs must be > 0, got {args.lr} and {args.epochs}")
    options = build(UnlearnOptions, args, UNLEARN_FLAGS)
    out = check_dir(args.out, "--out", args.overwrite, protect=(Path(args.model),))
    if options.uses_retain and not args.retain:
        raise UsageError(f"--method {args.method} has a retain term: give --retain JSONL (or use --method ga)")
    if options.uses_retain and args.ratio == 0:
        raise UsageError(
            f"--ratio 0 pairs no retain example with each forget example, but --method {args.method} has a retain "
            "term: use --ratio 1 or more (default 3), or --method ga"
        )
    if args.method == "rapidun" and not args.rapidun_without_clean:
        missing = [n for n, r in enumerate(read_jsonl(args.forget)) if "clean_response" not in r]
        if missing:
            raise UsageError(
                f"--method rapidun trains towards each forget example's clean_response, but examples {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} of {args.forget} have none: add 'clean_response' to every "
                "line, or pass --rapidun-without-clean for weighted gradient ascent on the responses"
            )
    from transformers import TrainingArguments

    from ..unlearn import UnlearnDataset, UnlearnTrainer

    model, tok = load_model(args.model, "float32", device_arg(args))
    forget = examples_from_jsonl(tok, args.forget, args.max_length, args.eos)
    retain = examples_from_jsonl(tok, args.retain, args.max_length, args.eos) if args.retain else []
    forget, fw, rw = _load_weights(args.weights, forget, len(retain) if retain else None)
    dataset = UnlearnDataset(
        forget, retain, ratio=args.ratio if retain else 0, forget_weights=fw, retain_weights=rw, seed=args.seed
    )
    lora = None
    if args.lora_r:
        from peft import LoraConfig

        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            target_modules=args.lora_targets or "all-linear",
            lora_dropout=0.0,
        )
    from ..outputs import atomic_path

    with atomic_path(out) as tmp:
        stats = _train(args, options, model, tok, dataset, lora, TrainingArguments, UnlearnTrainer, tmp)
    log.info("unlearned model written to %s (%d steps, %d tokens)", out, stats["steps"], stats["tokens"])
    return 0


def _train(args, options, model, tok, dataset, lora, TrainingArguments, UnlearnTrainer, out: Path) -> dict:
    """Train and save the model (or adapter), its tokenizer and unlearn_stats.json into ``out``."""
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.steps or -1,
        bf16=args.bf16,
        use_cpu=next(model.parameters()).device.type == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=args.logging_steps,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = UnlearnTrainer(model=model, args=targs, options=options, lora=lora, train_dataset=dataset)
    result = trainer.train()
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    stats = {
        "method": args.method,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "tokens": trainer.tokens_processed,
        "steps": trainer.state.global_step,
        "log": trainer.state.log_history,
    }
    Path(out, "unlearn_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "unlearn",
        help=summary(__doc__),
        description="Unlearn --forget while keeping --retain; writes the model (or LoRA adapter) and "
        "unlearn_stats.json.",
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument(
        "--forget", required=True, help="JSONL: prompt, response (the answer to forget), optional clean_response"
    )
    p.add_argument("--retain", help="JSONL: prompt, response (needed by every method but ga)")
    p.add_argument("--weights", help="JSON from `fastinfluence weights` ({'forget': [...], 'retain': [...]})")
    p.add_argument(
        "--out",
        required=True,
        help="output directory: new, or an earlier unlearn output with --overwrite (written under a temporary name, "
        "renamed when done)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier unlearn output in --out")
    p.add_argument("--ratio", type=int, default=3, help="retain examples per forget example (default 3)")
    option = functools.partial(add, p, UnlearnOptions, UNLEARN_FLAGS)
    option("method", "unlearning method", choices=METHODS)
    option("alpha", "retain-term coefficient")
    option("gamma", "forget-term coefficient")
    option("beta", "NPO / SimNPO temperature (none: 0.1 for npo, 2.5 for simnpo)", type=float)
    option("simnpo_gamma", "SimNPO margin, in the paper's units")
    option("delta", "SimNPO margin, in open-unlearning's units (gamma = beta * delta)")
    option("reduction", "example: mean of per-example means; token: token mean over the batch", choices=REDUCTIONS)
    option("weight_norm", "weighted losses divided by the batch size (mean) or the weights' sum", choices=WEIGHT_NORMS)
    option("retain_loss_type", "retain term: NLL, or KL to the model before unlearning", choices=RETAIN_LOSS_TYPES)
    option(
        "loss_reweight_tau",
        "also weight forget examples by N * softmax(-loss / tau) of the batch (LoReUn-style)",
        type=float,
    )
    option(
        "rapidun_tokens",
        "rapidun: answer tokens of the forget loss (differing: where clean and poisoned differ)",
        choices=RAPIDUN_TOKENS,
    )
    option(
        "rapidun_without_clean",
        "rapidun: accept forget lines without clean_response (their forget term is weighted gradient ascent)",
    )
    option(
        "router_aux_loss",
        "MoE models: add the router auxiliary (load-balancing) loss times the model's router_aux_loss_coef "
        "(left out by default)",
    )
    p.add_argument(
        "--lora-r",
        type=int,
        default=0,
        help="train a LoRA adapter of this rank instead of the full model (RapidUn: 16)",
    )
    p.add_argument("--lora-targets", nargs="+", help="LoRA target module names (default all-linear)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the forget set (default 1)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=4, help="forget examples per device batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per example (default 512)")
    add_eos_arg(p)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    add_device(p)
    p.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_unlearn)
