"""CLI subcommands ``weights``, ``unlearn`` and ``evaluate`` (plugged into ``fastinfluence.cli``).

    fastinfluence weights --method rapidun --ff ff.npy --fr fr.npy --rf rf.npy --rr rr.npy --out w.json
    fastinfluence unlearn --model DIR --forget forget.jsonl --retain retain.jsonl --weights w.json \\
        --method rapidun --lora-r 16 --out runs/unlearned
    fastinfluence evaluate --model runs/unlearned --forget forget.jsonl --holdout holdout.jsonl \\
        --clean clean.jsonl --attack attack.json --out runs/unlearned/eval.json

Data files are JSONL with ``prompt`` and ``response`` (forget lines may add
``clean_response``, the answer RapidUn trains towards). Score matrices are ``.npy`` (as
``fastinfluence score --matrix`` writes them) or ``.pt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("fastinfluence")


def _load_tensor(path: str, flag: str):
    """A score matrix or gradient tensor from ``.npy`` (as ``score --matrix`` writes it) or ``.pt``."""
    import numpy as np
    import torch

    from .cli import CLIError

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {path}: no such file")
    if p.suffix == ".npy":
        try:
            t = torch.from_numpy(np.array(np.load(p, mmap_mode="r", allow_pickle=False)))
        except ValueError:
            raise CLIError(
                f"{flag} {path} is not a .npy array (numpy cannot read it); give the matrix "
                "`fastinfluence score --matrix` wrote"
            ) from None
    elif p.suffix in (".pt", ".pth"):
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises pickle/zip errors of many types
            raise CLIError(
                f"{flag} {path} is not a tensor saved with torch.save ({type(exc).__name__}); give a .npy or .pt tensor"
            ) from None
    else:
        raise CLIError(
            f"{flag} {path}: give a .npy or .pt tensor file (as `fastinfluence score --matrix` writes), not "
            f"{p.suffix or 'a file without extension'}"
        )
    if not isinstance(t, torch.Tensor):
        raise CLIError(f"{flag} {path} must hold one tensor, found {type(t).__name__}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise CLIError(f"{flag} {path} must hold finite float scores (dtype {t.dtype})")
    return t


def _weights(args) -> int:
    from . import weights
    from .cli import CLIError
    from .outputs import check_file

    out_path = check_file(args.out, "--out", args.overwrite)

    if args.method == "rapidun":
        missing = [n for n in ("ff", "fr", "rf", "rr") if getattr(args, n) is None]
        if missing:
            raise CLIError(f"--method rapidun needs --{' --'.join(missing)}")
        w = weights.rapidun(
            *(_load_tensor(getattr(args, n), f"--{n}") for n in ("ff", "fr", "rf", "rr")),
            tau_f=args.tau_f,
            tau_r=args.tau_r,
            w_min=args.w_min,
            w_max=args.w_max,
            aggregate=args.aggregate,
            topk=args.topk,
            rows="queries",  # the (Q, N) matrices `fastinfluence score --matrix` writes
        )
        out = {"method": "rapidun", "forget": w.forget.tolist(), "retain": w.retain.tolist()}
    elif args.method == "imu":
        if args.forget_grads is None:
            raise CLIError("--method imu needs --forget-grads (an (N, D) .npy/.pt of LM-head gradients)")
        retain = _load_tensor(args.retain_grads, "--retain-grads") if args.retain_grads else None
        w = weights.imu(_load_tensor(args.forget_grads, "--forget-grads"), retain, keep_fraction=args.keep_fraction)
        out = {"method": "imu", "forget": w.weights.tolist(), "influence": w.influence.tolist()}
    else:
        if args.scores is None:
            raise CLIError("--method low_influence needs --scores (a (Q, N) or (N,) .npy/.pt)")
        r = weights.low_influence(
            _load_tensor(args.scores, "--scores"), quantile=args.quantile, threshold=args.threshold, rows="queries"
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


def examples_from_jsonl(tokenizer, path: str, max_length: int, eos: bool = True) -> list[dict]:
    """UnlearnDataset examples, encoded by ``fastinfluence.data`` (prompt tokens -100, response + eos the answer);
    a line's ``clean_response`` becomes the example's ``clean`` encoding."""
    from .data import encode, read_jsonl

    out = []
    for e in encode(tokenizer, read_jsonl(path), max_length, eos, fields=("clean_response",)):
        ex = {"input_ids": e["input_ids"], "labels": e["labels"]}
        if "clean_response" in e:
            ex["clean"] = e["clean_response"]
        out.append(ex)
    return out


def _json_file(path: str, flag: str):
    from .cli import CLIError

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {path}: no such file")
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CLIError(f"{flag} {path} is not valid JSON ({exc})") from None


def _load_weights(path: str):
    from .cli import CLIError
    from .weights import load_weights

    try:
        return load_weights(path)
    except (OSError, ValueError) as exc:
        raise CLIError(f"--weights: {exc}") from None


def _device_arg(args) -> str:
    from .cli import _device

    return "cpu" if args.cpu else _device(args.device)


def _unlearn(args) -> int:
    from .cli import CLIError, load_model, positive
    from .data import read_jsonl
    from .outputs import check_dir

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
        raise CLIError(f"--lr and --epochs must be > 0, got {args.lr} and {args.epochs}")
    out = check_dir(args.out, "--out", args.overwrite, protect=(Path(args.model),))
    if args.method != "ga" and not args.retain:
        raise CLIError(f"--method {args.method} has a retain term: give --retain JSONL (or use --method ga)")
    if args.method != "ga" and args.ratio == 0:
        raise CLIError(
            f"--ratio 0 pairs no retain example with each forget example, but --method {args.method} has a retain "
            "term: use --ratio 1 or more (default 3), or --method ga"
        )
    if args.method == "rapidun" and not args.rapidun_without_clean:
        missing = [n for n, r in enumerate(read_jsonl(args.forget)) if "clean_response" not in r]
        if missing:
            raise CLIError(
                f"--method rapidun trains towards each forget example's clean_response, but examples {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} of {args.forget} have none: add 'clean_response' to every "
                "line, or pass --rapidun-without-clean for weighted gradient ascent on the responses"
            )
    w = _load_weights(args.weights) if args.weights else None
    from transformers import TrainingArguments

    from .unlearn import UnlearnDataset, UnlearnTrainer

    model, tok = load_model(args.model, "float32", _device_arg(args))
    forget = examples_from_jsonl(tok, args.forget, args.max_length, args.eos)
    retain = examples_from_jsonl(tok, args.retain, args.max_length, args.eos) if args.retain else []
    fw = rw = None
    if w is not None:  # skipped (low-influence) forget examples are dropped: see fastinfluence.weights
        try:
            keep, fw, rw = w.select(len(forget), len(retain) if retain else None, f"--weights {args.weights}")
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        if len(keep) < len(forget):
            log.info("low-influence skipping: %d of %d forget examples kept", len(keep), len(forget))
        forget = [forget[i] for i in keep]
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
    from .outputs import atomic_path

    with atomic_path(out) as tmp:
        stats = _train(args, model, tok, dataset, lora, TrainingArguments, UnlearnTrainer, tmp)
    log.info("unlearned model written to %s (%d steps, %d tokens)", out, stats["steps"], stats["tokens"])
    return 0


def _train(args, model, tok, dataset, lora, TrainingArguments, UnlearnTrainer, out: Path) -> dict:
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
    trainer = UnlearnTrainer(
        model=model,
        args=targs,
        method=args.method,
        alpha=args.alpha,
        beta=args.beta,
        loss_reweight_tau=args.loss_reweight_tau,
        lora=lora,
        train_dataset=dataset,
        rapidun_without_clean=args.rapidun_without_clean,
    )
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


def _evaluate(args) -> int:
    from .cli import CLIError, encode, load_model, positive
    from .data import read_jsonl
    from .evaluate import check_attack, evaluate
    from .outputs import check_file, write_text

    positive(args.batch_size, "--batch-size")
    positive(args.max_length, "--max-length", 2)
    if args.holdout and not args.forget:
        raise CLIError("--holdout (non-members) is compared with --forget (members): give --forget too")
    if args.retrained and not args.forget:
        raise CLIError("--retrained is compared on --forget: give --forget too")
    if not (args.clean or args.forget or args.attack):
        raise CLIError("nothing to evaluate: give --clean, --forget (with --holdout, --retrained) or --attack")
    out = check_file(args.out, "--out", args.overwrite)
    records = {flag: read_jsonl(getattr(args, flag)) for flag in ("clean", "forget", "holdout") if getattr(args, flag)}
    attack = _json_file(args.attack, "--attack") if args.attack else None
    if attack is not None:
        try:
            check_attack(attack)
        except ValueError as exc:
            raise CLIError(f"--attack {args.attack}: {exc}") from None
    device = _device_arg(args)
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


def _add_device(p) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto: the GPU when there is one, else cpu (default auto)",
    )
    p.add_argument("--cpu", action="store_true", help="same as --device cpu")


def register(subparsers) -> None:
    from .cli import Registry

    p = subparsers.add_parser(
        "weights",
        help="per-example unlearning weights from influence scores (RapidUn, IMU, low-influence)",
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
        choices=Registry("fastinfluence.weights", "AGGREGATES"),
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

    p = subparsers.add_parser(
        "unlearn",
        help="unlearn a forget set with UnlearnTrainer (GA, GradDiff, NPO, SimNPO, RapidUn)",
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
        "--method", default="graddiff", choices=Registry("fastinfluence.unlearn", "METHODS"), help="default graddiff"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory: new, or an earlier unlearn output with --overwrite (written under a temporary name, "
        "renamed when done)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier unlearn output in --out")
    p.add_argument("--ratio", type=int, default=3, help="retain examples per forget example (default 3)")
    p.add_argument(
        "--rapidun-without-clean",
        action="store_true",
        help="rapidun: accept forget lines without clean_response (their forget term is weighted gradient ascent)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="retain-term coefficient (default 1)")
    p.add_argument("--beta", type=float, help="NPO / SimNPO temperature (default 0.1 / 2.5)")
    p.add_argument(
        "--loss-reweight-tau",
        type=float,
        help="also weight forget examples by N * softmax(-loss / tau) of the batch (LoReUn-style)",
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
    p.add_argument(
        "--no-eos",
        dest="eos",
        action="store_false",
        help="do not end each response with the end-of-sequence token (see fastinfluence.data)",
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    _add_device(p)
    p.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_unlearn)

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate an (unlearned) model: perplexity, ASR, MIA AUC, privleak, forget quality",
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
    p.add_argument(
        "--no-eos",
        dest="eos",
        action="store_false",
        help="do not end each response with the end-of-sequence token (see fastinfluence.data)",
    )
    _add_device(p)
    p.set_defaults(func=_evaluate)
