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


def _load_tensor(path: str):
    import numpy as np
    import torch

    if path.endswith(".npy"):
        return torch.from_numpy(np.array(np.load(path, mmap_mode="r")))
    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path} must hold one tensor, found {type(t).__name__}")
    return t


def _weights(args) -> int:
    from . import weights

    if args.method == "rapidun":
        missing = [n for n in ("ff", "fr", "rf", "rr") if getattr(args, n) is None]
        if missing:
            raise SystemExit(f"--method rapidun needs --{' --'.join(missing)}")
        w = weights.rapidun(*(_load_tensor(getattr(args, n)) for n in ("ff", "fr", "rf", "rr")),
                            tau_f=args.tau_f, tau_r=args.tau_r, w_min=args.w_min, w_max=args.w_max,
                            aggregate=args.aggregate, topk=args.topk)
        out = {"method": "rapidun", "forget": w.forget.tolist(), "retain": w.retain.tolist()}
    elif args.method == "imu":
        if args.forget_grads is None:
            raise SystemExit("--method imu needs --forget-grads (an (N, D) .npy/.pt of LM-head gradients)")
        retain = _load_tensor(args.retain_grads) if args.retain_grads else None
        w = weights.imu(_load_tensor(args.forget_grads), retain, keep_fraction=args.keep_fraction)
        out = {"method": "imu", "forget": w.weights.tolist(), "influence": w.influence.tolist()}
    else:
        if args.scores is None:
            raise SystemExit("--method low_influence needs --scores (a (Q, N) or (N,) .npy/.pt)")
        r = weights.low_influence(_load_tensor(args.scores), quantile=args.quantile, threshold=args.threshold)
        out = {"method": "low_influence", "n": len(r.skip), "keep": r.keep.tolist(), "threshold": r.threshold,
               "compute_saved": r.compute_saved}
    Path(args.out).write_text(json.dumps(out))
    log.info("wrote %s weights to %s", args.method, args.out)
    return 0


def examples_from_jsonl(tokenizer, path: str, max_length: int) -> list[dict]:
    """UnlearnDataset examples: prompt tokens are context (-100), response tokens are the answer."""
    from .cli import read_jsonl

    def encode(prompt: str, response: str) -> dict:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            a = a + [tokenizer.eos_token_id]
        return {"input_ids": (p + a)[:max_length], "labels": ([-100] * len(p) + a)[:max_length]}

    out = []
    for r in read_jsonl(path):
        ex = encode(r["prompt"], r["response"])
        if "clean_response" in r:
            ex["clean"] = encode(r["prompt"], r["clean_response"])
        out.append(ex)
    return out


def _unlearn(args) -> int:
    from transformers import TrainingArguments

    from .cli import load_model
    from .unlearn import UnlearnDataset, UnlearnTrainer

    model, tok = load_model(args.model, "float32", "cpu" if args.cpu else "cuda" if _cuda() else "cpu")
    forget = examples_from_jsonl(tok, args.forget, args.max_length)
    retain = examples_from_jsonl(tok, args.retain, args.max_length) if args.retain else []
    fw = rw = None
    if args.weights:
        w = json.loads(Path(args.weights).read_text())
        if not {"forget", "retain", "keep"} & set(w):
            raise SystemExit(f"{args.weights} holds none of 'forget', 'retain', 'keep': write it with `fastinfluence weights`")
        fw, rw = w.get("forget"), w.get("retain")
        if "keep" in w:  # low-influence skipping: only the kept forget examples are unlearned
            keep, n = w["keep"], w.get("n", len(forget))
            if n != len(forget) or any(not 0 <= i < len(forget) for i in keep):
                raise SystemExit(f"{args.weights} was made for {n} forget examples, --forget has {len(forget)}; they must match")
            if not keep:
                raise SystemExit(f"{args.weights} skips every forget example: lower the quantile or threshold")
            if fw is not None and len(fw) == len(forget):
                fw = [fw[i] for i in keep]
            forget = [forget[i] for i in keep]
            log.info("low-influence skipping: %d of %d forget examples kept", len(forget), n)
    dataset = UnlearnDataset(forget, retain, ratio=args.ratio if retain else 0, forget_weights=fw, retain_weights=rw, seed=args.seed)
    lora = None
    if args.lora_r:
        from peft import LoraConfig

        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=args.lora_targets or "all-linear", lora_dropout=0.0)
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.steps or -1, bf16=args.bf16,
        use_cpu=args.cpu or not _cuda(), report_to=[], save_strategy="no", logging_steps=args.logging_steps,
        seed=args.seed, disable_tqdm=True,
    )
    trainer = UnlearnTrainer(model=model, args=targs, method=args.method, alpha=args.alpha, beta=args.beta,
                             loss_reweight_tau=args.loss_reweight_tau, lora=lora, train_dataset=dataset)
    result = trainer.train()
    trainer.save_model(args.out)
    tok.save_pretrained(args.out)
    stats = {"method": args.method, "train_runtime_s": result.metrics.get("train_runtime"),
             "tokens": trainer.tokens_processed, "steps": trainer.state.global_step, "log": trainer.state.log_history}
    Path(args.out, "unlearn_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("unlearned model written to %s (%d steps, %d tokens)", args.out, stats["steps"], stats["tokens"])
    return 0


def _evaluate(args) -> int:
    from .cli import encode, load_model, read_jsonl
    from .evaluate import evaluate

    device = "cpu" if args.cpu or not _cuda() else "cuda"
    model, tok = load_model(args.model, "float32", device)
    batches = lambda path: encode(tok, read_jsonl(path), args.batch_size, args.max_length) if path else None  # noqa: E731
    retrained = load_model(args.retrained, "float32", device)[0] if args.retrained else None
    attack = json.loads(Path(args.attack).read_text()) if args.attack else None
    stats_file = Path(args.model, "unlearn_stats.json")
    stats = None
    if stats_file.exists():
        s = json.loads(stats_file.read_text())
        stats = {"unlearn_runtime_s": s["train_runtime_s"], "unlearn_tokens": s["tokens"]}
    result = evaluate(model, clean=batches(args.clean), forget=batches(args.forget), holdout=batches(args.holdout),
                      tokenizer=tok, attack=attack, retrained=retrained, train_stats=stats, output=args.out)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="per-example unlearning weights from influence scores (RapidUn, IMU, low-influence)",
                              description="Turn score matrices or gradients into per-example weights, written as JSON.")
    p.add_argument("--method", required=True, choices=["rapidun", "imu", "low_influence"])
    p.add_argument("--out", required=True, help="JSON output: {'forget': [...], 'retain': [...]} (rapidun), {'forget', 'influence'} (imu), {'keep', ...} (low_influence)")
    for n, what in (("ff", "forget queries x forget train"), ("fr", "retain queries x forget train"),
                    ("rf", "forget queries x retain train"), ("rr", "retain queries x retain train")):
        p.add_argument(f"--{n}", help=f"rapidun: (Q, N) score matrix, {what} (.npy or .pt)")
    p.add_argument("--tau-f", type=float, default=0.7, help="rapidun forget temperature (default 0.7)")
    p.add_argument("--tau-r", type=float, default=1.2, help="rapidun retain temperature (default 1.2)")
    p.add_argument("--w-min", type=float, default=0.2, help="rapidun smallest weight before normalisation (default 0.2)")
    p.add_argument("--w-max", type=float, default=3.0, help="rapidun largest weight before normalisation (default 3)")
    p.add_argument("--aggregate", default="mean", choices=["mean", "topk_median"], help="rapidun: per train example, mean over queries or RapidUn's top-k then median (default mean)")
    p.add_argument("--topk", type=int, help="rapidun topk_median: scores kept per query (default all)")
    p.add_argument("--forget-grads", help="imu: (Nf, D) LM-head gradients of the forget set (.npy or .pt)")
    p.add_argument("--retain-grads", help="imu: (Nr, D) gradients also used for the Fisher (optional)")
    p.add_argument("--keep-fraction", type=float, default=1.0, help="imu: fraction of negative-influence examples kept (default 1)")
    p.add_argument("--scores", help="low_influence: (Q, N) or (N,) scores (.npy or .pt)")
    p.add_argument("--quantile", type=float, help="low_influence: skip |score| at or below this quantile")
    p.add_argument("--threshold", type=float, help="low_influence: skip |score| at or below this value")
    p.set_defaults(func=_weights)

    p = subparsers.add_parser("unlearn", help="unlearn a forget set with UnlearnTrainer (GA, GradDiff, NPO, SimNPO, RapidUn)",
                              description="Unlearn --forget while keeping --retain; writes the model (or LoRA adapter) and unlearn_stats.json.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--forget", required=True, help="JSONL: prompt, response (the answer to forget), optional clean_response")
    p.add_argument("--retain", help="JSONL: prompt, response (needed by every method but ga)")
    p.add_argument("--weights", help="JSON from `fastinfluence weights` ({'forget': [...], 'retain': [...]})")
    p.add_argument("--method", default="graddiff", choices=["ga", "graddiff", "npo", "simnpo", "rapidun"], help="default graddiff")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ratio", type=int, default=3, help="retain examples per forget example (default 3)")
    p.add_argument("--alpha", type=float, default=1.0, help="retain-term coefficient (default 1)")
    p.add_argument("--beta", type=float, help="NPO / SimNPO temperature (default 0.1 / 2.5)")
    p.add_argument("--loss-reweight-tau", type=float, help="also weight forget examples by N * softmax(-loss / tau) of the batch (LoReUn-style)")
    p.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank instead of the full model (RapidUn: 16)")
    p.add_argument("--lora-targets", nargs="+", help="LoRA target module names (default all-linear)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the forget set (default 1)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=4, help="forget examples per device batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per example (default 512)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_unlearn)

    p = subparsers.add_parser("evaluate", help="evaluate an (unlearned) model: perplexity, ASR, MIA AUC, privleak, forget quality",
                              description="Each metric runs when its inputs are given; the result is printed and written as JSON.")
    p.add_argument("--model", required=True, help="model or adapter directory (unlearn_stats.json in it is merged)")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--clean", help="JSONL for clean perplexity")
    p.add_argument("--forget", help="JSONL of the forget set (members)")
    p.add_argument("--holdout", help="JSONL of non-members, for MIA AUC and privleak")
    p.add_argument("--retrained", help="model retrained without the forget set, for privleak and forget quality")
    p.add_argument("--attack", help="JSON {'target': str, '<group>': [prompts], ...} for attack success rates")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.set_defaults(func=_evaluate)
