"""Helpers shared by the CPU benchmark scripts: interleaved timing, relative error, the commit."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, timed in turns so that load from other processes on a
    shared machine falls on every provider alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm())


def commit() -> str:
    """The short commit of the checkout the benchmark runs in ("" outside git)."""
    run = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return run.stdout.strip()


def bench_llama(
    vocab: int = 512,
    hidden: int = 256,
    layers: int = 4,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int | None = None,
    tie: bool = False,
):
    """The CPU bench model: a tiny ``LlamaForCausalLM`` from a config (seeded by the caller), in eval mode.

    ``intermediate`` defaults to Llama's 8/3 x hidden rounded down to a multiple of 8.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def add_model_args(ap, batch: int = 8, seq: int = 128) -> None:
    """The bench model's size flags (``--hidden --layers --vocab --batch --seq``) shared by the CPU benches."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)


def model_record(args, model) -> dict:
    """The bench model as a results file records it."""
    return {
        "arch": "llama",
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "params": sum(p.numel() for p in model.parameters()),
    }


def step_timer():
    """A ``TrainerCallback`` recording the process CPU time of each optimizer step in ``.times``
    (on_step_begin -> on_step_end: forward, backward, clipping, optimizer step, any callback's hooks)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.process_time() - self._t0)

    return StepTimer()
